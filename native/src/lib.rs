//! cdc's compiled core (imported as `cdc._native`; see cdc/native.py): the per-change work of the
//! connector that costs most in Python, done the same way to the byte.
//!
//! - `FrameParser.parse`: an XLogData frame -> the XLogData object the Python parser makes.
//! - `ChangeDecoder.decode`: a pgoutput Insert, Update or Delete message -> its message object.
//! - `TupleReader.read`: a pgoutput TupleData -> the tuple of column values the Python reader makes
//!   (bytes, None, the unchanged-TOAST marker).
//! - `RowPlan.row`: those values -> the row dict of JSON values, with a plan compiled once per
//!   relation version: per column skip (dropped by the privacy policy), one of the conversions below,
//!   or the column's Python converter.
//! - `LsnFormatter.format`: an LSN -> its text.
//! - `InsertEncoder.encode` (insert_record.rs): an Insert message -> its event's Kafka key and value,
//!   the bytes the steps above and cdc.events.codec make, in one step.
//! - `EventReader.read` (event_reader.rs): for the sinks, a record value -> the event and position
//!   cdc.events.codec's Python readers make.
//! - `RecordBatch` (record_batch.rs): the producer's Kafka record batches, a run of events per call.
//!
//! The rule that keeps both paths identical: this code converts only text in the exact form
//! PostgreSQL prints (the walsender's DateStyle ISO, TimeZone UTC). Anything else, and any error,
//! goes to the column's Python converter (or, for a tuple, returns None so the Python reader
//! decides), so odd input gets the Python path's value or error message.

mod insert_record;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PyString, PyTuple, PyType};

// Column conversions. The numbers are cdc.source.postgres.values' NATIVE_* constants.
const PYTHON: u8 = 0; // the column's Python converter
const INT: u8 = 1; // smallint, integer: int
const BIGINT: u8 = 2; // int within +-2**53, else its decimal text
const FLOAT: u8 = 3; // real, double: float; NaN and the infinities as text
const BOOL: u8 = 4; // text == "t"
const JSON: u8 = 5; // json, jsonb: orjson.Fragment of the bytes as sent
const TEXT: u8 = 6; // the text itself (numeric, interval, uuid, text, every type without a kind)
const DATE: u8 = 7; // yyyy-mm-dd as is
const TIMESTAMPTZ: u8 = 8; // ISO-8601 in UTC with a Z
const BYTEA: u8 = 9; // \x hex -> base64
const TEXT_ARRAY: u8 = 10; // an array of TEXT elements, ',' delimited: nested lists of str / None

const MAX_SAFE_INTEGER: i128 = 1 << 53;

#[pyclass(frozen, module = "cdc._native")]
struct TupleReader {
    unchanged_toast: Py<PyAny>,
}

#[pymethods]
impl TupleReader {
    #[new]
    fn new(unchanged_toast: Py<PyAny>) -> Self {
        TupleReader { unchanged_toast }
    }

    /// TupleData at `off` of `data` -> (values, offset after it), or None where the Python reader
    /// must decide (binary values, unknown kinds, short or inconsistent data: it names the problem).
    fn read<'py>(&self, py: Python<'py>, data: &Bound<'py, PyBytes>, off: usize) -> PyResult<Option<(Bound<'py, PyTuple>, usize)>> {
        read_tuple(py, data.as_bytes(), off, self.unchanged_toast.bind(py))
    }
}

fn read_tuple<'py>(py: Python<'py>, b: &[u8], off: usize, unchanged_toast: &Bound<'py, PyAny>) -> PyResult<Option<(Bound<'py, PyTuple>, usize)>> {
    let size = b.len();
    if off.checked_add(2).is_none_or(|end| end > size) {
        return Ok(None);
    }
    let ncols = i16::from_be_bytes([b[off], b[off + 1]]);
    if ncols < 0 {
        return Ok(None);
    }
    let mut pos = off + 2;
    let mut values: Vec<Bound<'py, PyAny>> = Vec::with_capacity(ncols as usize);
    for _ in 0..ncols {
        if pos >= size {
            return Ok(None);
        }
        match b[pos] {
            b't' => {
                if pos + 5 > size {
                    return Ok(None);
                }
                let length = i32::from_be_bytes([b[pos + 1], b[pos + 2], b[pos + 3], b[pos + 4]]);
                if length < 0 {
                    return Ok(None);
                }
                let start = pos + 5;
                let end = start + length as usize;
                if end > size {
                    return Ok(None);
                }
                values.push(PyBytes::new(py, &b[start..end]).into_any());
                pos = end;
            }
            b'n' => {
                values.push(py.None().into_bound(py));
                pos += 1;
            }
            b'u' => {
                values.push(unchanged_toast.clone());
                pos += 1;
            }
            _ => return Ok(None),
        }
    }
    Ok(Some((PyTuple::new(py, values)?, pos)))
}

/// pgoutput's Insert, Update and Delete messages -> cdc.source.postgres.pgoutput's Insert, Update and
/// Delete objects, or None where the Python decoder must decide (another kind, anything malformed).
#[pyclass(frozen, module = "cdc._native")]
struct ChangeDecoder {
    unchanged_toast: Py<PyAny>,
    object_new: Py<PyAny>,
    insert: Py<PyType>,
    update: Py<PyType>,
    delete: Py<PyType>,
    names: [Py<PyString>; 4], // relation_id, old, key, new
}

#[pymethods]
impl ChangeDecoder {
    /// The classes are frozen slotted dataclasses: their fields are set as object.__setattr__ does.
    #[new]
    fn new(py: Python<'_>, unchanged_toast: Py<PyAny>, insert: Py<PyType>, update: Py<PyType>, delete: Py<PyType>) -> PyResult<Self> {
        let object_new = py.get_type::<pyo3::types::PyAny>().getattr("__new__")?.unbind();
        let names = ["relation_id", "old", "key", "new"].map(|n| pyo3::types::PyString::intern(py, n).unbind());
        Ok(ChangeDecoder { unchanged_toast, object_new, insert, update, delete, names })
    }

    fn decode<'py>(&self, py: Python<'py>, data: &Bound<'py, PyBytes>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let b = data.as_bytes();
        if b.len() < 6 {
            return Ok(None);
        }
        let relation_id = u32::from_be_bytes([b[1], b[2], b[3], b[4]]).into_pyobject(py)?.into_any();
        let toast = self.unchanged_toast.bind(py);
        let none = py.None().into_bound(py);
        let (class, old, key, new, end) = match (b[0], b[5]) {
            (b'I', b'N') => {
                let Some((new, end)) = read_tuple(py, b, 6, toast)? else { return Ok(None) };
                (&self.insert, None, None, Some(new), end)
            }
            (b'U', marker @ (b'K' | b'O' | b'N')) => {
                let mut off = 6;
                let mut before = None;
                if marker != b'N' {
                    let Some((image, end)) = read_tuple(py, b, off, toast)? else { return Ok(None) };
                    if b.get(end) != Some(&b'N') {
                        return Ok(None);
                    }
                    before = Some(image);
                    off = end + 1;
                }
                let Some((new, end)) = read_tuple(py, b, off, toast)? else { return Ok(None) };
                let (old, key) = if marker == b'O' { (before, None) } else { (None, before) };
                (&self.update, old, key, Some(new), end)
            }
            (b'D', marker @ (b'K' | b'O')) => {
                let Some((image, end)) = read_tuple(py, b, 6, toast)? else { return Ok(None) };
                let (old, key) = if marker == b'O' { (Some(image), None) } else { (None, Some(image)) };
                (&self.delete, old, key, None, end)
            }
            _ => return Ok(None),
        };
        if end != b.len() {
            return Ok(None); // trailing bytes: the Python decoder says how many
        }
        let message = self.object_new.bind(py).call1((class.bind(py),))?;
        set_field(&message, &self.names[0], &relation_id)?;
        let kind = b[0];
        if kind != b'I' {
            set_field(&message, &self.names[1], &old.map_or_else(|| none.clone(), |t| t.into_any()))?;
            set_field(&message, &self.names[2], &key.map_or_else(|| none.clone(), |t| t.into_any()))?;
        }
        if let Some(new) = new {
            set_field(&message, &self.names[3], &new.into_any())?;
        }
        Ok(Some(message))
    }
}

/// object.__setattr__(obj, name, value): past the frozen dataclass's own __setattr__.
fn set_field(obj: &Bound<'_, PyAny>, name: &Py<PyString>, value: &Bound<'_, PyAny>) -> PyResult<()> {
    // SAFETY: three live object pointers held by the GIL-bound references above.
    let status = unsafe { pyo3::ffi::PyObject_GenericSetAttr(obj.as_ptr(), name.as_ptr(), value.as_ptr()) };
    if status < 0 {
        Err(PyErr::fetch(obj.py()))
    } else {
        Ok(())
    }
}

struct PlannedColumn {
    name: Py<PyString>,
    conversion: u8,
    converter: Option<Py<PyAny>>, // None: the column is not decoded (the privacy policy drops it)
}

#[pyclass(frozen, module = "cdc._native")]
struct RowPlan {
    columns: Vec<PlannedColumn>,
    unchanged_toast: Py<PyAny>,
    unchanged: Py<PyAny>,
    fragment: Py<PyAny>,
}

#[pymethods]
impl RowPlan {
    /// `columns`: (name, conversion, Python converter or None) per column of the relation;
    /// `unchanged_toast` the reader's marker of a value not sent, `unchanged` the row's;
    /// `fragment`: orjson.Fragment.
    #[new]
    fn new(
        columns: Vec<(Py<PyString>, u8, Option<Py<PyAny>>)>,
        unchanged_toast: Py<PyAny>,
        unchanged: Py<PyAny>,
        fragment: Py<PyAny>,
    ) -> PyResult<Self> {
        let mut planned = Vec::with_capacity(columns.len());
        for (name, conversion, converter) in columns {
            if conversion > TEXT_ARRAY {
                return Err(pyo3::exceptions::PyValueError::new_err(format!("unknown conversion {conversion}")));
            }
            planned.push(PlannedColumn { name, conversion, converter });
        }
        Ok(RowPlan { columns: planned, unchanged_toast, unchanged, fragment })
    }

    /// A tuple's values -> the row: what TableStream's Python path makes of them, column by column
    /// (zip semantics: as many columns as both have). Raises what a Python converter raised.
    fn row<'py>(&self, py: Python<'py>, values: &Bound<'py, PyTuple>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        let toast = self.unchanged_toast.bind(py);
        for (column, raw) in self.columns.iter().zip(values.iter()) {
            let Some(converter) = &column.converter else { continue };
            let value = if raw.is_none() {
                raw
            } else if raw.is(toast) {
                self.unchanged.bind(py).clone()
            } else {
                let native = match raw.cast_exact::<PyBytes>() {
                    Ok(bytes) => self.convert(py, column.conversion, bytes)?,
                    Err(_) => None, // a binary value (a bytes subclass), or a snapshot's other form
                };
                match native {
                    Some(value) => value,
                    None => converter.bind(py).call1((raw,))?,
                }
            };
            out.set_item(column.name.bind(py), value)?;
        }
        Ok(out)
    }
}

impl RowPlan {
    /// The JSON value of one column's text, or None: not in the form PostgreSQL prints, so the
    /// Python converter decides.
    fn convert<'py>(&self, py: Python<'py>, conversion: u8, raw: &Bound<'py, PyBytes>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let text = raw.as_bytes();
        Ok(match conversion {
            INT => parse_integer(text).and_then(|v| i64::try_from(v).ok()).map(|v| v.into_pyobject(py).unwrap().into_any()),
            BIGINT => parse_integer(text).map(|v| {
                if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&v) {
                    (v as i64).into_pyobject(py).unwrap().into_any()
                } else {
                    PyString::new(py, &v.to_string()).into_any()
                }
            }),
            FLOAT => parse_float(text).map(|v| {
                if v.is_finite() {
                    v.into_pyobject(py).unwrap().into_any()
                } else {
                    PyString::new(py, if v.is_nan() { "NaN" } else if v > 0.0 { "Infinity" } else { "-Infinity" }).into_any()
                }
            }),
            BOOL => Some(PyBool::new(py, text == b"t").to_owned().into_any()),
            JSON => Some(self.fragment.bind(py).call1((raw,))?),
            TEXT => std::str::from_utf8(text).ok().map(|s| PyString::new(py, s).into_any()),
            DATE => is_date(text).then(|| PyString::new(py, ascii(text)).into_any()),
            TIMESTAMPTZ => timestamptz_iso(text).map(|s| PyString::new(py, &s).into_any()),
            BYTEA => bytea_base64(text).map(|s| PyString::new(py, &s).into_any()),
            TEXT_ARRAY => parse_text_array(py, text)?,
            _ => None, // PYTHON
        })
    }
}

fn ascii(text: &[u8]) -> &str {
    std::str::from_utf8(text).expect("checked to be ASCII")
}

/// `-?[0-9]{1,38}` (int() reads more forms: those go to Python).
fn parse_integer(text: &[u8]) -> Option<i128> {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    if digits.is_empty() || digits.len() > 38 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    ascii(text).parse::<i128>().ok()
}

/// PostgreSQL's float output: NaN, Infinity, -Infinity, or `-?digits[.digits][e[+-]digits]`.
/// Rust's and Python's parsers both round correctly, so the same text gives the same double.
fn parse_float(text: &[u8]) -> Option<f64> {
    match text {
        b"NaN" => return Some(f64::NAN),
        b"Infinity" => return Some(f64::INFINITY),
        b"-Infinity" => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    // Each part: its lead-in, then at least one digit.
    let mut i = usize::from(text.first() == Some(&b'-'));
    i = digit_run(text, i)?;
    if text.get(i) == Some(&b'.') {
        i = digit_run(text, i + 1)?;
    }
    if text.get(i) == Some(&b'e') {
        i += 1;
        if matches!(text.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        i = digit_run(text, i)?;
    }
    if i != text.len() {
        return None;
    }
    ascii(text).parse::<f64>().ok()
}

/// The offset after the digits at `start`, if there is at least one.
fn digit_run(text: &[u8], start: usize) -> Option<usize> {
    let end = start + text.get(start..)?.iter().take_while(|c| c.is_ascii_digit()).count();
    (end > start).then_some(end)
}

fn digits(text: &[u8]) -> bool {
    text.iter().all(u8::is_ascii_digit)
}

/// `\d{4}-\d\d-\d\d`, the whole text (values.py's fast path of dates).
fn is_date(text: &[u8]) -> bool {
    text.len() == 10 && digits(&text[0..4]) && text[4] == b'-' && digits(&text[5..7]) && text[7] == b'-' && digits(&text[8..10])
}

/// values.py's fast path of timestamptz: `{day} {hh:mm:ss}[.f{1,6}]+00` -> `{day}T{clock}[.ffffff]Z`
/// (the fraction padded to 6 digits; none when it is zero).
fn timestamptz_iso(text: &[u8]) -> Option<String> {
    if text.len() < 22 || !is_date(&text[0..10]) || text[10] != b' ' {
        return None;
    }
    let clock = &text[11..19];
    let valid_clock = matches!((clock[0], clock[1]), (b'0'..=b'1', b'0'..=b'9') | (b'2', b'0'..=b'3'))
        && clock[2] == b':'
        && (b'0'..=b'5').contains(&clock[3])
        && clock[4].is_ascii_digit()
        && clock[5] == b':'
        && (b'0'..=b'5').contains(&clock[6])
        && clock[7].is_ascii_digit();
    if !valid_clock {
        return None;
    }
    let rest = &text[19..];
    let (fraction, zone) = if rest.first() == Some(&b'.') {
        let n = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 6 {
            return None;
        }
        (&rest[1..1 + n], &rest[1 + n..])
    } else {
        (&rest[0..0], rest)
    };
    if zone != b"+00" {
        return None;
    }
    let mut out = String::with_capacity(32);
    out.push_str(ascii(&text[0..10]));
    out.push('T');
    out.push_str(ascii(clock));
    if fraction.iter().any(|&c| c != b'0') {
        out.push('.');
        out.push_str(ascii(fraction));
        for _ in fraction.len()..6 {
            out.push('0');
        }
    }
    out.push('Z');
    Some(out)
}

/// bytea's hex output (`\x` and lowercase hex pairs) -> standard base64 with padding.
fn bytea_base64(text: &[u8]) -> Option<String> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let mut bytes = Vec::with_capacity(hex.len() / 2);
    for pair in hex.chunks_exact(2) {
        bytes.push(nibble(pair[0])? << 4 | nibble(pair[1])?);
    }
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16) | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8) | u32::from(*chunk.get(2).unwrap_or(&0));
        out.push(ALPHABET[(n >> 18) as usize & 63] as char);
        out.push(ALPHABET[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 { ALPHABET[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if chunk.len() > 2 { ALPHABET[n as usize & 63] as char } else { '=' });
    }
    Some(out)
}

/// An array's text as PostgreSQL's array_out prints it with the ',' delimiter and no dimension
/// prefix -> nested lists of str, NULL as None; None for anything else (the psycopg loader decides).
fn parse_text_array<'py>(py: Python<'py>, text: &[u8]) -> PyResult<Option<Bound<'py, PyAny>>> {
    let Some(items) = parse_array(text) else { return Ok(None) };
    Ok(Some(array_to_py(py, &items)?.into_any()))
}

/// One element of a text array: NULL, a string, or a nested array.
enum ArrayItem {
    Null,
    Text(String),
    List(Vec<ArrayItem>),
}

/// The array text, whole, as its items; None for anything not in array_out's form.
fn parse_array(text: &[u8]) -> Option<Vec<ArrayItem>> {
    let mut pos = 0;
    let items = parse_array_level(text, &mut pos, 0)?;
    (pos == text.len()).then_some(items)
}

fn array_to_py<'py>(py: Python<'py>, items: &[ArrayItem]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for item in items {
        match item {
            ArrayItem::Null => list.append(py.None())?,
            ArrayItem::Text(s) => list.append(PyString::new(py, s))?,
            ArrayItem::List(inner) => list.append(array_to_py(py, inner)?)?,
        }
    }
    Ok(list)
}

fn parse_array_level(text: &[u8], pos: &mut usize, depth: usize) -> Option<Vec<ArrayItem>> {
    if depth > 6 || text.get(*pos) != Some(&b'{') {
        return None; // PostgreSQL allows 6 dimensions
    }
    *pos += 1;
    let mut list = Vec::new();
    if text.get(*pos) == Some(&b'}') {
        *pos += 1;
        return Some(list);
    }
    loop {
        match text.get(*pos) {
            Some(b'{') => list.push(ArrayItem::List(parse_array_level(text, pos, depth + 1)?)),
            Some(b'"') => {
                *pos += 1;
                let mut element = Vec::new();
                loop {
                    match text.get(*pos) {
                        Some(b'"') => break,
                        Some(b'\\') => match text.get(*pos + 1) {
                            Some(&c @ (b'"' | b'\\')) => {
                                element.push(c);
                                *pos += 2;
                            }
                            _ => return None,
                        },
                        Some(&c) => {
                            element.push(c);
                            *pos += 1;
                        }
                        None => return None,
                    }
                }
                *pos += 1;
                list.push(ArrayItem::Text(String::from_utf8(element).ok()?));
            }
            Some(_) => {
                let start = *pos;
                while let Some(&c) = text.get(*pos) {
                    if matches!(c, b',' | b'}' | b'{' | b'"' | b'\\') || c.is_ascii_whitespace() {
                        break;
                    }
                    *pos += 1;
                }
                let element = &text[start..*pos];
                if element.is_empty() {
                    return None;
                }
                if element == b"NULL" {
                    list.push(ArrayItem::Null);
                } else {
                    list.push(ArrayItem::Text(std::str::from_utf8(element).ok()?.to_owned()));
                }
            }
            None => return None,
        }
        match text.get(*pos) {
            Some(b',') => *pos += 1,
            Some(b'}') => {
                *pos += 1;
                return Some(list);
            }
            _ => return None,
        }
    }
}

/// The walsender's XLogData frames ('w') -> cdc.source.postgres.frames' XLogData objects (the payload a
/// memoryview into the frame, as the Python parser makes it), or None where the Python parser decides
/// (keepalives, anything malformed, a buffer that is not bytes).
#[pyclass(frozen, module = "cdc._native")]
struct FrameParser {
    object_new: Py<PyAny>,
    xlogdata: Py<PyType>,
    names: [Py<PyString>; 4], // start_lsn, end_lsn, send_time_us, payload
}

#[pymethods]
impl FrameParser {
    #[new]
    fn new(py: Python<'_>, xlogdata: Py<PyType>) -> PyResult<Self> {
        let object_new = py.get_type::<pyo3::types::PyAny>().getattr("__new__")?.unbind();
        let names = ["start_lsn", "end_lsn", "send_time_us", "payload"].map(|n| PyString::intern(py, n).unbind());
        Ok(FrameParser { object_new, xlogdata, names })
    }

    fn parse<'py>(&self, py: Python<'py>, buf: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Ok(frame) = buf.cast_exact::<PyBytes>() else { return Ok(None) };
        let b = frame.as_bytes();
        if b.len() < 25 || b[0] != b'w' {
            return Ok(None);
        }
        let word = |at: usize| <[u8; 8]>::try_from(&b[at..at + 8]).expect("8 bytes");
        let start_lsn = u64::from_be_bytes(word(1)).into_pyobject(py)?.into_any();
        let end_lsn = u64::from_be_bytes(word(9)).into_pyobject(py)?.into_any();
        let send_time_us = i64::from_be_bytes(word(17)).into_pyobject(py)?.into_any();
        let view = pyo3::types::PyMemoryView::from(frame.as_any())?;
        let payload = view.get_item(pyo3::types::PySlice::new(py, 25, b.len() as isize, 1))?;
        let message = self.object_new.bind(py).call1((self.xlogdata.bind(py),))?;
        for (name, value) in self.names.iter().zip([start_lsn, end_lsn, send_time_us, payload]) {
            set_field(&message, name, &value)?;
        }
        Ok(Some(message))
    }
}

/// cdc.lsn.format_lsn: an LSN -> `16/B374D848` (upper-case hex halves, as PostgreSQL prints it). Any
/// int that is not an LSN (negative, past 64 bits) goes to the Python function given.
#[pyclass(frozen, module = "cdc._native")]
struct LsnFormatter {
    fallback: Py<PyAny>,
}

#[pymethods]
impl LsnFormatter {
    #[new]
    fn new(fallback: Py<PyAny>) -> Self {
        LsnFormatter { fallback }
    }

    fn format<'py>(&self, py: Python<'py>, lsn: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        match lsn.cast_exact::<pyo3::types::PyInt>().ok().and_then(|n| n.extract::<u64>().ok()) {
            Some(n) => Ok(PyString::new(py, &format!("{:X}/{:X}", n >> 32, n & 0xFFFF_FFFF)).into_any()),
            None => self.fallback.bind(py).call1((lsn,)),
        }
    }
}

mod event_reader; // a sink's record values -> events (EventReader)
mod record_batch; // a producer's Kafka record batches (RecordBatch)
mod fetched_records; // a consumer's fetched record batches -> records (read_fetched)
mod copy_text; // a PostgreSQL sink's upserts -> COPY data (copy_text)

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TupleReader>()?;
    m.add_class::<RowPlan>()?;
    m.add_class::<ChangeDecoder>()?;
    m.add_class::<LsnFormatter>()?;
    m.add_class::<FrameParser>()?;
    m.add_class::<insert_record::InsertEncoder>()?;
    m.add("INSERT_CONVERSIONS", insert_record::CONVERSIONS.map(i32::from).to_vec())?;
    m.add_class::<event_reader::EventReader>()?;
    m.add_class::<record_batch::RecordBatch>()?;
    m.add_function(wrap_pyfunction!(record_batch::crc32c_of, m)?)?;
    m.add_class::<fetched_records::FetchedRecord>()?;
    m.add_function(wrap_pyfunction!(fetched_records::read_fetched, m)?)?;
    m.add_function(wrap_pyfunction!(copy_text::copy_text, m)?)?;
    m.add("CONVERSIONS", (PYTHON, INT, BIGINT, FLOAT, BOOL, JSON, TEXT, DATE, TIMESTAMPTZ, BYTEA, TEXT_ARRAY))?;
    Ok(())
}
