//! `RecordBatch`: a Kafka record batch (message format v2, uncompressed) built in one buffer, so
//! that publishing a run of events is one call, not a Python call (and a small buffer) per record.
//!
//! The bytes are those aiokafka's `DefaultRecordBatchBuilder` writes for the same records, producer
//! state and timestamps (tests/unit/test_record_batch.py builds both and compares them):
//! - the 61-byte batch header: base offset 0, batch length, partition leader epoch -1, magic 2,
//!   CRC-32C of everything after the CRC, attributes (0, or the transactional bit), last offset
//!   delta, first and max timestamp, producer id, epoch, base sequence, record count;
//! - per record: its length, attributes 0, timestamp delta, offset delta, key, value and headers,
//!   each length a zigzag varint (-1: null).
//!
//! Like aiokafka's (compiled) builder it always takes a batch's first record, and then only records
//! that leave the batch shorter than `batch_size`.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

pub(crate) const HEADER_SIZE: usize = 61;
pub(crate) const CRC_OFFSET: usize = 17;
pub(crate) const ATTRIBUTES_OFFSET: usize = 21;
const TRANSACTIONAL: i16 = 0x10;
const MAGIC: u8 = 2;

#[pyclass(module = "cdc._native")]
pub struct RecordBatch {
    buf: Vec<u8>, // HEADER_SIZE bytes written by `build`, then the records
    batch_size: usize,
    count: i32,
    first_ts: i64,
    max_ts: i64,
    built: bool,
    // The headers object of the last call and its encoding: a stream passes the same list with
    // every event of a table (the Publisher counts its size once by identity too).
    last_headers: Option<Py<PyAny>>,
    last_encoded: Vec<u8>,
}

#[pymethods]
impl RecordBatch {
    #[new]
    fn new(batch_size: usize) -> Self {
        // Grown as records come: a quiet stream's batches hold a few records, a backlog's fill up.
        let mut buf = Vec::with_capacity(batch_size.clamp(HEADER_SIZE, 64 * 1024));
        buf.resize(HEADER_SIZE, 0);
        RecordBatch {
            buf,
            batch_size,
            count: 0,
            first_ts: 0,
            max_ts: 0,
            built: false,
            last_headers: None,
            last_encoded: Vec::new(),
        }
    }

    /// One record with `headers` ([(name, bytes or None)]) at `timestamp_ms` (None: now): False
    /// when the batch is full (or built).
    #[pyo3(signature = (key, value, headers, timestamp_ms=None))]
    fn append(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &Bound<'_, PyAny>,
        timestamp_ms: Option<i64>,
    ) -> PyResult<bool> {
        self.remember_headers(headers)?;
        let encoded = std::mem::take(&mut self.last_encoded);
        let took = self.push(key, value, &encoded, timestamp_ms.unwrap_or_else(now_ms));
        self.last_encoded = encoded;
        Ok(took)
    }

    /// records[start:] ((key, value) tuples of bytes or None), all with `headers` and
    /// `timestamp_ms` (None: now), while they fit and none weighs more than `max_record` (its key,
    /// value and `header_bytes`, as the caller counts them): (how many it took, their weight).
    #[pyo3(signature = (records, start, headers, header_bytes, max_record, timestamp_ms=None))]
    fn append_many(
        &mut self,
        records: &Bound<'_, PyList>,
        start: usize,
        headers: &Bound<'_, PyAny>,
        header_bytes: usize,
        max_record: usize,
        timestamp_ms: Option<i64>,
    ) -> PyResult<(usize, usize)> {
        self.remember_headers(headers)?;
        let encoded = std::mem::take(&mut self.last_encoded);
        let timestamp_ms = timestamp_ms.unwrap_or_else(now_ms);
        let (mut added, mut weight) = (0, 0);
        for i in start..records.len() {
            let item = records.get_item(i)?;
            let pair = item.cast::<PyTuple>()?;
            let (key_item, value_item) = (pair.get_item(0)?, pair.get_item(1)?);
            let (key, value) = (optional_bytes(&key_item)?, optional_bytes(&value_item)?);
            let record_weight = key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len) + header_bytes;
            if record_weight > max_record || !self.push(key, value, &encoded, timestamp_ms) {
                break;
            }
            added += 1;
            weight += record_weight;
        }
        self.last_encoded = encoded;
        Ok((added, weight))
    }

    /// The batch's bytes with this producer state; the batch takes no record after it.
    fn build<'py>(
        &mut self,
        py: Python<'py>,
        producer_id: i64,
        producer_epoch: i16,
        base_sequence: i32,
        transactional: bool,
    ) -> Bound<'py, PyBytes> {
        self.built = true;
        let batch_length = (self.buf.len() - 12) as i32; // from the partition leader epoch on
        let attributes: i16 = if transactional { TRANSACTIONAL } else { 0 };
        let last_offset_delta = (self.count - 1).max(0);
        let (first_ts, max_ts) = if self.count == 0 { (-1, -1) } else { (self.first_ts, self.max_ts) }; // as aiokafka's
        let h = &mut self.buf[..HEADER_SIZE];
        h[0..8].copy_from_slice(&0i64.to_be_bytes());
        h[8..12].copy_from_slice(&batch_length.to_be_bytes());
        h[12..16].copy_from_slice(&(-1i32).to_be_bytes());
        h[16] = MAGIC;
        h[21..23].copy_from_slice(&attributes.to_be_bytes());
        h[23..27].copy_from_slice(&last_offset_delta.to_be_bytes());
        h[27..35].copy_from_slice(&first_ts.to_be_bytes());
        h[35..43].copy_from_slice(&max_ts.to_be_bytes());
        h[43..51].copy_from_slice(&producer_id.to_be_bytes());
        h[51..53].copy_from_slice(&producer_epoch.to_be_bytes());
        h[53..57].copy_from_slice(&base_sequence.to_be_bytes());
        h[57..61].copy_from_slice(&self.count.to_be_bytes());
        let crc = crc32c(&self.buf[ATTRIBUTES_OFFSET..]);
        self.buf[CRC_OFFSET..ATTRIBUTES_OFFSET].copy_from_slice(&crc.to_be_bytes());
        PyBytes::new(py, &self.buf)
    }

    #[getter]
    fn record_count(&self) -> i32 {
        self.count
    }

    /// Bytes of the batch as built (header included).
    #[getter]
    fn size(&self) -> usize {
        self.buf.len()
    }
}

impl RecordBatch {
    fn remember_headers(&mut self, headers: &Bound<'_, PyAny>) -> PyResult<()> {
        if self.last_headers.as_ref().is_some_and(|last| last.is(headers)) {
            return Ok(());
        }
        self.last_encoded = encode_headers(headers)?;
        self.last_headers = Some(headers.clone().unbind());
        Ok(())
    }

    fn push(&mut self, key: Option<&[u8]>, value: Option<&[u8]>, headers: &[u8], timestamp_ms: i64) -> bool {
        if self.built {
            return false;
        }
        let first = self.count == 0;
        let delta = if first { 0 } else { timestamp_ms - self.first_ts };
        let body = 1 // attributes
            + varint_size(delta)
            + varint_size(self.count as i64)
            + key.map_or(1, |k| varint_size(k.len() as i64) + k.len())
            + value.map_or(1, |v| varint_size(v.len() as i64) + v.len())
            + headers.len();
        if !first && self.buf.len() + varint_size(body as i64) + body >= self.batch_size {
            return false;
        }
        if first {
            self.first_ts = timestamp_ms;
            self.max_ts = timestamp_ms;
        } else {
            self.max_ts = self.max_ts.max(timestamp_ms);
        }
        let buf = &mut self.buf;
        put_varint(buf, body as i64);
        buf.push(0);
        put_varint(buf, delta);
        put_varint(buf, self.count as i64);
        put_optional(buf, key);
        put_optional(buf, value);
        buf.extend_from_slice(headers);
        self.count += 1;
        true
    }
}

fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    since_epoch.as_millis() as i64
}

fn optional_bytes<'a>(item: &'a Bound<'_, PyAny>) -> PyResult<Option<&'a [u8]>> {
    if item.is_none() {
        return Ok(None);
    }
    Ok(Some(item.cast::<PyBytes>()?.as_bytes()))
}

/// A record's headers as they follow its value: their count, then each name and value.
fn encode_headers(headers: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let items = headers.try_iter()?.collect::<PyResult<Vec<_>>>()?;
    let mut out = Vec::new();
    put_varint(&mut out, items.len() as i64);
    for item in &items {
        let (name, value) = item
            .extract::<(Bound<'_, PyString>, Bound<'_, PyAny>)>()
            .map_err(|_| PyValueError::new_err("a header is a (name, value) pair: a str and bytes or None"))?;
        put_optional(&mut out, Some(name.to_str()?.as_bytes()));
        put_optional(&mut out, optional_bytes(&value)?);
    }
    Ok(out)
}

fn put_optional(buf: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => {
            put_varint(buf, b.len() as i64);
            buf.extend_from_slice(b);
        }
        None => put_varint(buf, -1),
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn put_varint(buf: &mut Vec<u8>, v: i64) {
    let mut z = zigzag(v);
    while z >= 0x80 {
        buf.push((z as u8) | 0x80);
        z >>= 7;
    }
    buf.push(z as u8);
}

fn varint_size(v: i64) -> usize {
    let bits = 64 - zigzag(v).leading_zeros() as usize;
    bits.max(1).div_ceil(7)
}

/// CRC-32C (Castagnoli), as Kafka checks a batch: the SSE 4.2 instruction where the CPU has it.
pub fn crc32c(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the CPU has SSE 4.2, checked just above.
            return unsafe { crc32c_sse42(data) };
        }
    }
    crc32c_table(data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42(data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut crc = u32::MAX as u64;
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        crc = _mm_crc32_u64(crc, u64::from_le_bytes(chunk.try_into().unwrap()));
    }
    let mut crc = crc as u32;
    for &b in chunks.remainder() {
        crc = _mm_crc32_u8(crc, b);
    }
    !crc
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32c_table(data: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &b in data {
        crc = CRC_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[pyfunction]
pub fn crc32c_of(data: &[u8], table: bool) -> u32 {
    if table {
        crc32c_table(data)
    } else {
        crc32c(data)
    }
}
