//! `read_fetched`: the record batches of one partition in a fetch response -> the records a
//! consumer hands on, with the attributes of aiokafka's `ConsumerRecord`, in one call per fetch
//! instead of a Python object per record and field (cdc.sink.fetched_records installs it).
//!
//! It reads what cdc's producers write: message format v2, uncompressed. For anything else in the
//! response (an older format, a compressed batch, a CRC that does not match, a batch whose records
//! do not add up) it returns None and aiokafka's own reader reads the whole response: it then says
//! what is wrong the way it always does, after the records before it.
//!
//! Reading as aiokafka does (aiokafka/record/default_records.py, memory_records.py): batches follow
//! each other while a whole one is left (a fetch may end inside one); a control batch has no
//! records for the consumer, only its next offset; a record's timestamp is the batch's max one for
//! log-append time, else the first one plus its delta; header names are UTF-8.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use crate::record_batch::{crc32c, ATTRIBUTES_OFFSET, CRC_OFFSET, HEADER_SIZE};

const LOG_OVERHEAD: usize = 12; // base offset (8) + batch length (4)
const MAGIC_OFFSET: usize = 16;
const COMPRESSION_MASK: i16 = 0x07;
const LOG_APPEND_TIME: i16 = 0x08;
const CONTROL: i16 = 0x20;

/// A consumed record: the attributes of aiokafka's ConsumerRecord that cdc's consumers read.
#[pyclass(module = "cdc._native")]
pub struct FetchedRecord {
    #[pyo3(get)]
    topic: Py<PyString>,
    #[pyo3(get)]
    partition: i32,
    #[pyo3(get)]
    offset: i64,
    #[pyo3(get)]
    timestamp: i64,
    #[pyo3(get)]
    timestamp_type: i32,
    #[pyo3(get)]
    key: Option<Py<PyBytes>>,
    #[pyo3(get)]
    value: Option<Py<PyBytes>>,
    #[pyo3(get)]
    serialized_key_size: i64,
    #[pyo3(get)]
    serialized_value_size: i64,
    // Settable: a sink gives records with equal headers the very same object (consume.share_headers).
    #[pyo3(get, set)]
    headers: Py<PyAny>,
}

#[pymethods]
impl FetchedRecord {
    /// Always None, as aiokafka gives it for message format v2.
    #[getter]
    fn checksum(&self) -> Option<i64> {
        None
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!("FetchedRecord(topic={}, partition={}, offset={})", self.topic.bind(py), self.partition, self.offset)
    }
}

/// The partition's batches in `buffer` as [(records, next offset)] in order (a control batch: no
/// records), or None where aiokafka's reader must read it. `check_crcs`: as the consumer's option.
#[pyfunction]
pub fn read_fetched<'py>(py: Python<'py>, buffer: &Bound<'py, PyBytes>, topic: Bound<'py, PyString>, partition: i32,
                         check_crcs: bool) -> PyResult<Option<Bound<'py, PyList>>> {
    let b = buffer.as_bytes();
    let out = PyList::empty(py);
    let mut pos = 0;
    // The headers of the record before and the tuple made of them: records of one table repeat them.
    let mut last_headers: Option<(&[u8], Py<PyAny>)> = None;
    while b.len() - pos >= LOG_OVERHEAD {
        let length = i32::from_be_bytes(b[pos + 8..pos + 12].try_into().unwrap());
        if length < 0 {
            return Ok(None);
        }
        let end = pos + LOG_OVERHEAD + length as usize;
        if end > b.len() {
            break; // the rest of a batch the broker cut at the fetch's size: fetched again from its offset
        }
        let batch = &b[pos..end];
        pos = end;
        if batch.len() < HEADER_SIZE || batch[MAGIC_OFFSET] != 2 {
            return Ok(None);
        }
        let attributes = i16::from_be_bytes(batch[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2].try_into().unwrap());
        if attributes & COMPRESSION_MASK != 0 {
            return Ok(None);
        }
        if check_crcs && crc32c(&batch[ATTRIBUTES_OFFSET..]) != u32::from_be_bytes(batch[CRC_OFFSET..CRC_OFFSET + 4].try_into().unwrap()) {
            return Ok(None);
        }
        let base_offset = i64::from_be_bytes(batch[0..8].try_into().unwrap());
        let last_offset_delta = i32::from_be_bytes(batch[23..27].try_into().unwrap()) as i64;
        let first_timestamp = i64::from_be_bytes(batch[27..35].try_into().unwrap());
        let max_timestamp = i64::from_be_bytes(batch[35..43].try_into().unwrap());
        let count = i32::from_be_bytes(batch[57..61].try_into().unwrap());
        let next_offset = base_offset + last_offset_delta + 1;
        let records = PyList::empty(py);
        if attributes & CONTROL == 0 {
            let log_append = attributes & LOG_APPEND_TIME != 0;
            let mut r = Cursor { b: batch, pos: HEADER_SIZE };
            for _ in 0..count.max(0) {
                let Some(record) = r.record() else { return Ok(None) };
                let timestamp = if log_append { max_timestamp } else { first_timestamp + record.timestamp_delta };
                let headers = match &last_headers {
                    Some((raw, made)) if *raw == record.headers => made.clone_ref(py),
                    _ => {
                        let Some(made) = headers_tuple(py, record.headers, record.header_count)? else { return Ok(None) };
                        last_headers = Some((record.headers, made.clone_ref(py)));
                        made
                    }
                };
                let fetched = FetchedRecord {
                    topic: topic.clone().unbind(),
                    partition,
                    offset: base_offset + record.offset_delta,
                    timestamp,
                    timestamp_type: log_append as i32,
                    key: record.key.map(|k| PyBytes::new(py, k).unbind()),
                    value: record.value.map(|v| PyBytes::new(py, v).unbind()),
                    serialized_key_size: record.key.map_or(-1, |k| k.len() as i64),
                    serialized_value_size: record.value.map_or(-1, |v| v.len() as i64),
                    headers,
                };
                records.append(Py::new(py, fetched)?)?;
            }
            if r.pos != batch.len() {
                return Ok(None);
            }
        }
        out.append((records, next_offset))?;
    }
    Ok(Some(out))
}

struct Record<'a> {
    timestamp_delta: i64,
    offset_delta: i64,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    headers: &'a [u8], // their encoding, after the count
    header_count: i64,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// The record at `pos` (length, attributes, timestamp delta, offset delta, key, value, headers),
    /// None if it does not read as one or its length does not match what it holds.
    fn record(&mut self) -> Option<Record<'a>> {
        let length = usize::try_from(self.varint()?).ok()?;
        let start = self.pos;
        self.varint()?; // attributes: none defined for records
        let timestamp_delta = self.varint()?;
        let offset_delta = self.varint()?;
        let key = self.optional()?;
        let value = self.optional()?;
        let header_count = self.varint()?;
        if header_count < 0 {
            return None;
        }
        let headers_start = self.pos;
        for _ in 0..header_count {
            self.name()?;
            self.optional()?;
        }
        let headers = &self.b[headers_start..self.pos];
        if self.pos - start != length {
            return None;
        }
        Some(Record { timestamp_delta, offset_delta, key, value, headers, header_count })
    }

    /// A zigzag varint (Kafka's varint and varlong alike), at most 10 bytes.
    fn varint(&mut self) -> Option<i64> {
        let mut z: u64 = 0;
        for shift in (0..70).step_by(7) {
            let byte = *self.b.get(self.pos)?;
            self.pos += 1;
            z |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Some((z >> 1) as i64 ^ -((z & 1) as i64));
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let bytes = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(bytes)
    }

    /// Bytes that may be null (length -1).
    fn optional(&mut self) -> Option<Option<&'a [u8]>> {
        match self.varint()? {
            -1 => Some(None),
            n if n >= 0 => Some(Some(self.take(n as usize)?)),
            _ => None,
        }
    }

    /// A header's name: a string, never null.
    fn name(&mut self) -> Option<&'a [u8]> {
        let n = self.varint()?;
        if n < 0 {
            return None;
        }
        self.take(n as usize)
    }
}

/// The headers as aiokafka gives them: a tuple of (name, value) tuples, names decoded as UTF-8.
/// None if a name is not UTF-8 (aiokafka's reader then raises its error).
fn headers_tuple(py: Python<'_>, raw: &[u8], count: i64) -> PyResult<Option<Py<PyAny>>> {
    let mut r = Cursor { b: raw, pos: 0 };
    let mut items = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (Some(name), Some(value)) = (r.name(), r.optional()) else { return Ok(None) };
        let Ok(name) = std::str::from_utf8(name) else { return Ok(None) };
        let value = match value {
            Some(v) => PyBytes::new(py, v).into_any(),
            None => py.None().into_bound(py),
        };
        items.push(PyTuple::new(py, [PyString::new(py, name).into_any(), value])?);
    }
    Ok(Some(PyTuple::new(py, items)?.into_any().unbind()))
}
