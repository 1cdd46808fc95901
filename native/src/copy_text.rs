//! `copy_text`: rows of a PostgreSQL sink's upserts -> the data of `COPY ... FROM STDIN` (text format)
//! in one call, where psycopg's `Copy.write_row` takes a Python call and a buffer step per row.
//!
//! It writes what psycopg writes for the same rows on a UTF-8 connection, and only for the values a
//! sink's converters give most (str, int, None): None is `\N`, an int its decimal digits, a str its
//! UTF-8 bytes with backslash, backspace, tab, newline, vertical tab, form feed and carriage return
//! escaped (psycopg's `_dump_re`); values are separated by tabs, rows end with a newline. For any
//! other value, or a str holding NUL (which psycopg refuses), it returns None and the caller writes
//! the rows with psycopg (tests/unit/test_copy_text.py compares both).

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt, PyList, PyString, PyTuple};

/// The COPY text of `rows` (a list of tuples), or None where psycopg must write them.
#[pyfunction]
pub fn copy_text<'py>(py: Python<'py>, rows: &Bound<'py, PyList>) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let mut out: Vec<u8> = Vec::with_capacity(rows.len() * 128);
    for row in rows.iter() {
        let Ok(row) = row.cast_exact::<PyTuple>() else { return Ok(None) };
        if row.is_empty() {
            out.push(b'\n'); // as psycopg writes an empty row
            continue;
        }
        for (i, value) in row.iter().enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            if value.is_none() {
                out.extend_from_slice(b"\\N");
            } else if let Ok(text) = value.cast_exact::<PyString>() {
                let Ok(text) = text.to_str() else { return Ok(None) }; // a lone surrogate: psycopg says what is wrong
                if !escape_into(&mut out, text.as_bytes()) {
                    return Ok(None);
                }
            } else if value.is_exact_instance_of::<PyInt>() {
                match value.extract::<i64>() {
                    Ok(n) => out.extend_from_slice(n.to_string().as_bytes()),
                    Err(_) => out.extend_from_slice(value.str()?.to_str()?.as_bytes()), // beyond 64 bits
                }
            } else {
                return Ok(None);
            }
        }
        out.push(b'\n');
    }
    Ok(Some(PyBytes::new(py, &out)))
}

/// `text` escaped for COPY's text format; false if it holds NUL (no text value can).
fn escape_into(out: &mut Vec<u8>, text: &[u8]) -> bool {
    let mut start = 0;
    for (i, &c) in text.iter().enumerate() {
        let escaped: &[u8] = match c {
            0 => return false,
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0b => b"\\v",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&text[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&text[start..]);
    true
}
