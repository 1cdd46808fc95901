//! `InsertEncoder.encode`: a pgoutput Insert message -> the Kafka key and value of its `c` event, in
//! one step: the connector's usual change, without the tuple, the row dict and the ChangeEvent that
//! the general path (`ChangeDecoder`, `RowPlan`, cdc.events.codec) makes on the way.
//!
//! The bytes are those of the general path, which encodes with orjson: values as `RowPlan` converts
//! them, written the way orjson writes them (compact, keys in column order, strings escaped as orjson
//! escapes them). It covers the conversions whose JSON text it can write exactly (`CONVERSIONS`: not
//! floats, whose shortest form is orjson's own, nor Python converters); anything else, anything
//! malformed and any value `RowPlan` would hand to a Python converter gives None, and the general
//! path publishes the change (tests/unit/test_native.py compares both paths).
//!
//! `InsertEncoder.encode_row` does the same for a snapshot chunk's row (its columns' texts, as the
//! chunk's SELECT returns them): the `r` event the snapshot publishes for it.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use std::io::Write;

use super::{
    bytea_base64, is_date, parse_array, parse_integer, timestamptz_iso, ArrayItem, BIGINT, BOOL, BYTEA, DATE, INT, JSON,
    MAX_SAFE_INTEGER, TEXT, TEXT_ARRAY, TIMESTAMPTZ,
};

/// The conversions this encoder writes (see lib.rs); a relation with any other column has none.
pub const CONVERSIONS: [u8; 9] = [INT, BIGINT, BOOL, JSON, TEXT, DATE, TIMESTAMPTZ, BYTEA, TEXT_ARRAY];

const INSERT_HEAD: &[u8] = br#"{"op":"c","before":null,"after":{"#;
const SNAPSHOT_HEAD: &[u8] = br#"{"op":"r","before":null,"after":{"#;

struct Column {
    name: Vec<u8>, // the name as a JSON string, then ':'
    conversion: u8,
    published: bool, // false: the privacy policy drops it (never in the event)
}

#[pyclass(frozen, module = "cdc._native")]
pub struct InsertEncoder {
    columns: Vec<Column>,
    key: Vec<usize>, // the key columns, in the key's order: indexes into `columns`
}

#[pymethods]
impl InsertEncoder {
    /// `columns`: (name as JSON text followed by ':', conversion, published) per column of the
    /// relation; `key`: the indexes of the key columns, in the key's order.
    #[new]
    fn new(columns: Vec<(Vec<u8>, u8, bool)>, key: Vec<usize>) -> PyResult<Self> {
        let columns: Vec<Column> =
            columns.into_iter().map(|(name, conversion, published)| Column { name, conversion, published }).collect();
        for column in &columns {
            if column.published && !CONVERSIONS.contains(&column.conversion) {
                return Err(pyo3::exceptions::PyValueError::new_err(format!("conversion {} is not encoded here", column.conversion)));
            }
        }
        if key.iter().any(|&i| i >= columns.len() || !columns[i].published) {
            return Err(pyo3::exceptions::PyValueError::new_err("a key column that is not published"));
        }
        Ok(InsertEncoder { columns, key })
    }

    /// An Insert message (`I`, relation id, `N`, TupleData) -> (key, value) of its `c` event at
    /// (`lsn`, `seq`) and `ts_ms`; None where the general path must decide. The event's `source` is
    /// `source_head`, the LSN's text, `","seq":`, seq, `source_tail` (cdc.events.codec.EventSources).
    #[allow(clippy::too_many_arguments)]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        message: &Bound<'py, PyBytes>,
        source_head: &Bound<'py, PyBytes>,
        lsn: &str,
        seq: u64,
        source_tail: &Bound<'py, PyBytes>,
        ts_ms: i64,
    ) -> Option<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let b = message.as_bytes();
        if b.len() < 8 || b[0] != b'I' || b[5] != b'N' {
            return None;
        }
        if i16::from_be_bytes([b[6], b[7]]) as i64 != self.columns.len() as i64 {
            return None; // the general path's zip decides what a short or long tuple means
        }
        let mut texts = Vec::with_capacity(self.columns.len());
        let mut pos = 8;
        for _ in 0..self.columns.len() {
            texts.push(match *b.get(pos)? {
                b't' => {
                    let length = i32::from_be_bytes(b.get(pos + 1..pos + 5)?.try_into().ok()?);
                    let start = pos + 5;
                    let end = start.checked_add(usize::try_from(length).ok()?)?;
                    pos = end;
                    Some(b.get(start..end)?)
                }
                b'n' => {
                    pos += 1;
                    None
                }
                _ => return None, // 'u' (never in an INSERT), 'b' (binary), anything else
            });
        }
        if pos != b.len() {
            return None;
        }
        let sizes = b.len() + source_head.as_bytes().len() + source_tail.as_bytes().len();
        let (key, value) =
            self.record(INSERT_HEAD, &texts, sizes, source_head.as_bytes(), lsn, seq, source_tail.as_bytes(), ts_ms)?;
        Some((PyBytes::new(py, &key), PyBytes::new(py, &value)))
    }

    /// A snapshot chunk's row (a tuple of each column's text as bytes, or None for NULL, in the
    /// relation's column order: cdc.source.postgres.snapshot) -> (key, value) of its `r` event, the
    /// rest as `encode`; `source_tail` is a snapshot source's (`"snapshot":true`).
    #[allow(clippy::too_many_arguments)]
    fn encode_row<'py>(
        &self,
        py: Python<'py>,
        row: &Bound<'py, PyTuple>,
        source_head: &Bound<'py, PyBytes>,
        lsn: &str,
        seq: u64,
        source_tail: &Bound<'py, PyBytes>,
        ts_ms: i64,
    ) -> Option<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let (key, value) = self.row_record(row, source_head.as_bytes(), lsn, seq, source_tail.as_bytes(), ts_ms)?;
        Some((PyBytes::new(py, &key), PyBytes::new(py, &value)))
    }

    /// `encode_row` for `rows[start:end]` of a chunk, at `seq`, `seq + 1`, ...: the records of the
    /// rows before the first one the general path must decide (that row and the rest are left), in
    /// one call instead of one per row.
    #[allow(clippy::too_many_arguments)]
    fn encode_rows<'py>(
        &self,
        py: Python<'py>,
        rows: &Bound<'py, PyList>,
        start: usize,
        end: usize,
        source_head: &Bound<'py, PyBytes>,
        lsn: &str,
        seq: u64,
        source_tail: &Bound<'py, PyBytes>,
        ts_ms: i64,
    ) -> PyResult<Bound<'py, PyList>> {
        let records = PyList::empty(py);
        let (head, tail) = (source_head.as_bytes(), source_tail.as_bytes());
        for (n, i) in (start..end.min(rows.len())).enumerate() {
            let item = rows.get_item(i)?;
            let Ok(row) = item.cast_exact::<PyTuple>() else { break };
            let Some((key, value)) = self.row_record(row, head, lsn, seq + n as u64, tail, ts_ms) else { break };
            records.append((PyBytes::new(py, &key), PyBytes::new(py, &value)))?;
        }
        Ok(records)
    }
}

impl InsertEncoder {
    /// A chunk's row (see `encode_row`) -> its record's key and value; None: the general path decides.
    fn row_record(
        &self,
        row: &Bound<'_, PyTuple>,
        head: &[u8],
        lsn: &str,
        seq: u64,
        tail: &[u8],
        ts_ms: i64,
    ) -> Option<(Vec<u8>, Vec<u8>)> {
        if row.len() != self.columns.len() {
            return None;
        }
        let items: Vec<Bound<'_, PyAny>> = row.iter().collect();
        let mut texts = Vec::with_capacity(items.len());
        let mut sizes = head.len() + tail.len();
        for item in &items {
            if item.is_none() {
                texts.push(None);
            } else {
                let text = item.cast_exact::<PyBytes>().ok()?.as_bytes();
                sizes += text.len() + 8;
                texts.push(Some(text));
            }
        }
        self.record(SNAPSHOT_HEAD, &texts, sizes, head, lsn, seq, tail, ts_ms)
    }

    /// The key and value of an event whose row is `texts` (each column's text, None for NULL).
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        value_head: &[u8],
        texts: &[Option<&[u8]>],
        sizes: usize,
        head: &[u8],
        lsn: &str,
        seq: u64,
        tail: &[u8],
        ts_ms: i64,
    ) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut value = Vec::with_capacity(sizes + 128);
        value.extend_from_slice(value_head);
        let mut spans = vec![(0usize, 0usize); self.columns.len()]; // each column's JSON in `value`
        let mut first = true;
        for (i, (column, text)) in self.columns.iter().zip(texts).enumerate() {
            if !column.published {
                continue;
            }
            if !first {
                value.push(b',');
            }
            first = false;
            value.extend_from_slice(&column.name);
            let start = value.len();
            match text {
                None => value.extend_from_slice(b"null"),
                Some(text) => write_value(&mut value, column.conversion, text)?,
            }
            spans[i] = (start, value.len());
        }
        value.extend_from_slice(br#"},"source":"#);
        value.extend_from_slice(head);
        write!(value, r#"{lsn}","seq":{seq}"#).ok()?;
        value.extend_from_slice(tail);
        write!(value, r#","ts_ms":{ts_ms}}}"#).ok()?;

        let mut key = Vec::with_capacity(64);
        key.push(b'{');
        for (n, &i) in self.key.iter().enumerate() {
            if n > 0 {
                key.push(b',');
            }
            key.extend_from_slice(&self.columns[i].name);
            let (start, end) = spans[i];
            key.extend_from_slice(&value[start..end]);
        }
        key.push(b'}');
        Some((key, value))
    }
}

/// The JSON of one column's text as `RowPlan.convert` converts it and orjson writes that; None
/// where `RowPlan` would call the column's Python converter.
fn write_value(out: &mut Vec<u8>, conversion: u8, text: &[u8]) -> Option<()> {
    match conversion {
        INT => {
            let v = i64::try_from(parse_integer(text)?).ok()?;
            write!(out, "{v}").ok()?;
        }
        BIGINT => {
            let v = parse_integer(text)?;
            if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&v) {
                write!(out, "{v}").ok()?;
            } else {
                write!(out, "\"{v}\"").ok()?;
            }
        }
        BOOL => out.extend_from_slice(if text == b"t" { b"true" } else { b"false" }),
        JSON => out.extend_from_slice(text), // orjson.Fragment: the text as sent
        TEXT => write_string(out, std::str::from_utf8(text).ok()?),
        DATE => {
            if !is_date(text) {
                return None;
            }
            out.push(b'"');
            out.extend_from_slice(text);
            out.push(b'"');
        }
        TIMESTAMPTZ => write_string(out, &timestamptz_iso(text)?),
        BYTEA => write_string(out, &bytea_base64(text)?),
        TEXT_ARRAY => write_array(out, &parse_array(text)?),
        _ => return None,
    }
    Some(())
}

fn write_array(out: &mut Vec<u8>, items: &[ArrayItem]) {
    out.push(b'[');
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        match item {
            ArrayItem::Null => out.extend_from_slice(b"null"),
            ArrayItem::Text(s) => write_string(out, s),
            ArrayItem::List(inner) => write_array(out, inner),
        }
    }
    out.push(b']');
}

/// A JSON string as orjson writes it: `"` and `\` escaped, control characters as \b \t \n \f \r or
/// \u00xx (lower-case hex), everything else (DEL, non-ASCII) as is.
fn write_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut clean = 0; // start of the run not yet copied
    for (i, &c) in bytes.iter().enumerate() {
        let escape: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\x08' => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\x0c' => b"\\f",
            b'\r' => b"\\r",
            0..=0x1f => {
                out.extend_from_slice(&bytes[clean..i]);
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(c >> 4) as usize], HEX[(c & 15) as usize]]);
                clean = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[clean..i]);
        out.extend_from_slice(escape);
        clean = i + 1;
    }
    out.extend_from_slice(&bytes[clean..]);
    out.push(b'"');
}
