//! `EventReader.read`: a change event's Kafka value -> (event, position), the objects
//! cdc.events.codec's Python reader gives for it, for a sink's hot path.
//!
//! What the Python reader gives (and so this): the event as dicts, lists, str, int, bool and None,
//! every number that is not an integer as `Decimal` of its text; in the `before`/`after` images the
//! values of the schema's json/jsonb columns as `JsonText` of their text exactly as the value holds
//! it (the text between the separators around it, whitespace included), json[]/jsonb[] lists as a
//! list of each item's text (None for a null item); the position from `source` (commit_lsn, lsn,
//! seq), as `Position`.
//!
//! The rule that keeps both readers identical: this reads only what it is sure of, the standard JSON
//! the connector writes. Anything else (not UTF-8, NaN, integers past 18 digits, lone surrogates,
//! control characters in strings, deep nesting, trailing data, no op/source, a position in any other
//! form) returns None, and the Python reader decides: its values, its error messages.

use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFrozenSet, PyInt, PyList, PyString, PyTuple};

/// Why reading stopped: the Python reader decides, or a Python call raised.
enum Stop {
    Fallback,
    Raised(PyErr),
}

impl From<PyErr> for Stop {
    fn from(err: PyErr) -> Self {
        Stop::Raised(err)
    }
}

impl From<std::convert::Infallible> for Stop {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

type Read<T> = Result<T, Stop>;

const MAX_DEPTH: usize = 256; // deeper than any event; the Python reader says what it says about more
const MAX_INT_DIGITS: usize = 18; // fits i64; longer integers are left to the Python reader
const STRING_SLOTS: usize = 1024; // short strings remembered (see Reader::string): 64 KiB, near the CPU
const MAX_CACHED_STRING: usize = 48; // a slot is then one cache line

/// A short string remembered: its bytes in place (no allocation per string made) and its object.
#[repr(align(64))]
struct CachedString {
    len: u8,
    bytes: [u8; MAX_CACHED_STRING],
    string: Py<PyString>,
}

#[pyclass(frozen, module = "cdc._native")]
pub struct EventReader {
    decimal: Py<PyAny>,
    json_text: Py<PyAny>,
    position: Py<PyAny>,
    tuple_new: Py<PyAny>, // tuple.__new__: a Position made in C (its own __new__ is Python code)
    names: [Py<PyString>; 7], // op, source, before, after, commit_lsn, lsn, seq
    strings: Mutex<Vec<Option<CachedString>>>,
}

#[pymethods]
impl EventReader {
    /// `decimal`: decimal.Decimal; `json_text`: cdc.events.codec.JsonText; `position`: cdc.lsn.Position.
    #[new]
    fn new(py: Python<'_>, decimal: Py<PyAny>, json_text: Py<PyAny>, position: Py<PyAny>) -> Self {
        let names = ["op", "source", "before", "after", "commit_lsn", "lsn", "seq"].map(|n| PyString::intern(py, n).unbind());
        let tuple_new = py.get_type::<PyTuple>().getattr("__new__").expect("tuple.__new__").unbind();
        EventReader { decimal, json_text, position, tuple_new, names, strings: Mutex::new((0..STRING_SLOTS).map(|_| None).collect()) }
    }

    /// The record value -> (event, position), or None where the Python reader must decide.
    /// `json_columns`: cdc.events.codec's JsonColumns of the record's schema (json/jsonb columns,
    /// json[]/jsonb[] columns, ...), or None. `lean`: the event without its `source` and `ts_ms`
    /// members (a sink reads only the position of the source): fewer objects per record.
    #[pyo3(signature = (value, json_columns, lean=false))]
    fn read<'py>(&self, py: Python<'py>, value: &Bound<'py, PyAny>, json_columns: &Bound<'py, PyAny>, lean: bool)
                 -> PyResult<Option<Bound<'py, PyTuple>>> {
        let Ok(bytes) = value.cast_exact::<pyo3::types::PyBytes>() else { return Ok(None) };
        let b = bytes.as_bytes();
        if std::str::from_utf8(b).is_err() {
            return Ok(None);
        }
        let (scalars, arrays) = if json_columns.is_none() {
            (None, None)
        } else {
            let columns = json_columns.cast::<PyTuple>()?;
            (Some(columns.get_item(0)?.cast_into::<PyFrozenSet>()?), Some(columns.get_item(1)?.cast_into::<PyFrozenSet>()?))
        };
        // (Busy only if another thread reads at the same time, while this one runs Python code: it
        // then reads without the cache rather than wait holding the GIL.)
        let mut guard = self.strings.try_lock().ok();
        let mut reader = Reader { py, b, pos: 0, owner: self, strings: guard.as_deref_mut(), scalars, arrays, lean,
                                  source: None };
        match reader.event() {
            Ok(found) => Ok(found),
            Err(Stop::Fallback) => Ok(None),
            Err(Stop::Raised(err)) => Err(err),
        }
    }
}

struct Reader<'a, 'py> {
    py: Python<'py>,
    b: &'a [u8], // valid UTF-8
    pos: usize,
    owner: &'a EventReader,
    strings: Option<&'a mut Vec<Option<CachedString>>>,
    scalars: Option<Bound<'py, PyFrozenSet>>,
    arrays: Option<Bound<'py, PyFrozenSet>>,
    lean: bool,
    // lean: the source's commit_lsn, lsn and seq, as its dict would hold them (the last of repeats)
    source: Option<[Option<Part<'py>>; 3]>,
}

/// A member of a lean event's source: an LSN read straight from its text as cdc writes it, or the
/// value itself (anything else, which the checks after reading judge).
enum Part<'py> {
    Lsn(u64),
    Value(Bound<'py, PyAny>),
}

/// What a value skipped over was, where only that matters (a json column's value).
#[derive(PartialEq)]
enum Kind {
    Null,
    List,
    Other,
}

impl<'a, 'py> Reader<'a, 'py> {
    fn event(&mut self) -> Read<Option<Bound<'py, PyTuple>>> {
        self.skip_ws();
        if self.peek() != Some(b'{') {
            return Err(Stop::Fallback);
        }
        let event = self.object(0, true, false)?;
        self.skip_ws();
        if self.pos != self.b.len() {
            return Err(Stop::Fallback);
        }
        let [op, source, _, _, commit_lsn, lsn, seq] = &self.owner.names;
        let py = self.py;
        match event.get_item(op.bind(py))? {
            Some(op) if op.is_exact_instance_of::<PyString>() => {}
            _ => return Err(Stop::Fallback),
        }
        let (Some(commit_lsn), Some(lsn), Some(seq)) = (if self.lean {
            let Some([commit_lsn, lsn, seq]) = self.source.take() else { return Err(Stop::Fallback) };
            (commit_lsn, lsn, match seq {
                Some(Part::Value(seq)) => Some(seq),
                _ => None,
            })
        } else {
            let Some(source) = event.get_item(source.bind(py))? else { return Err(Stop::Fallback) };
            let Ok(source) = source.cast_exact::<PyDict>() else { return Err(Stop::Fallback) };
            let part = |name: &Py<PyString>| source.get_item(name.bind(py)).map(|found| found.map(Part::Value));
            (part(commit_lsn)?, part(lsn)?, source.get_item(seq.bind(py))?)
        }) else {
            return Err(Stop::Fallback);
        };
        if !seq.is_exact_instance_of::<PyInt>() {
            return Err(Stop::Fallback);
        }
        let (Some(commit_lsn), Some(lsn)) = (part_lsn(&commit_lsn)?, part_lsn(&lsn)?) else { return Err(Stop::Fallback) };
        let parts = PyTuple::new(py, [commit_lsn.into_pyobject(py)?.into_any(), lsn.into_pyobject(py)?.into_any(), seq])?;
        let position = self.owner.tuple_new.bind(py).call1((self.owner.position.bind(py), parts))?;
        Ok(Some(PyTuple::new(py, [event.into_any(), position])?))
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Read<()> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(Stop::Fallback)
        }
    }

    /// The object at `pos` ('{'). `top`: the event itself, whose before/after objects are images;
    /// `image`: members named as json columns keep their text.
    fn object(&mut self, depth: usize, top: bool, image: bool) -> Read<Bound<'py, PyDict>> {
        if depth > MAX_DEPTH {
            return Err(Stop::Fallback);
        }
        self.pos += 1;
        let out = PyDict::new(self.py);
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(out);
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(Stop::Fallback);
            }
            let name = self.string()?;
            self.skip_ws();
            self.expect(b':')?;
            let start = self.pos;
            self.skip_ws();
            if top && self.lean {
                match name.to_str()? {
                    "source" => {
                        self.lean_source(depth + 1)?;
                        if !self.separator()? {
                            return Ok(out);
                        }
                        continue;
                    }
                    "ts_ms" => {
                        self.skip_value(depth + 1)?;
                        if !self.separator()? {
                            return Ok(out);
                        }
                        continue;
                    }
                    _ => {}
                }
            }
            let value = if image && self.is_json_column(&name)? {
                self.json_column(&name, start, depth)?
            } else if top && self.peek() == Some(b'{') && self.is_image_name(&name) {
                self.object(depth + 1, false, self.scalars.is_some())?.into_any()
            } else {
                self.value(depth + 1)?
            };
            out.set_item(name, value)?;
            if !self.separator()? {
                return Ok(out);
            }
        }
    }

    /// After an object's member: true past a ',' (another member follows), false past its '}'.
    fn separator(&mut self) -> Read<bool> {
        self.skip_ws();
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                self.skip_ws();
                Ok(true)
            }
            Some(b'}') => {
                self.pos += 1;
                Ok(false)
            }
            _ => Err(Stop::Fallback),
        }
    }

    /// lean: the event's `source` object at `pos`, of which only commit_lsn, lsn and seq are built
    /// (the rest checked as `value` reads it). A source that is no object, or a second one: the
    /// Python reader decides.
    fn lean_source(&mut self, depth: usize) -> Read<()> {
        if self.peek() != Some(b'{') || self.source.is_some() || depth > MAX_DEPTH {
            return Err(Stop::Fallback);
        }
        let mut parts: [Option<Part<'py>>; 3] = [None, None, None];
        self.pos += 1;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
        } else {
            loop {
                if self.peek() != Some(b'"') {
                    return Err(Stop::Fallback);
                }
                let name = self.string()?;
                self.skip_ws();
                self.expect(b':')?;
                self.skip_ws();
                let slot = match name.to_str()? {
                    "commit_lsn" => Some(0),
                    "lsn" => Some(1),
                    "seq" => Some(2),
                    _ => None,
                };
                match slot {
                    Some(i) if i < 2 && self.peek() == Some(b'"') => {
                        // An LSN: its value from the text as cdc writes it, without a str object.
                        let at = self.pos;
                        let (end, escaped) = self.skip_string()?;
                        parts[i] = Some(match lsn_bytes(&self.b[at + 1..end]).filter(|_| !escaped) {
                            Some(value) => Part::Lsn(value),
                            None => {
                                self.pos = at;
                                Part::Value(self.value(depth + 1)?)
                            }
                        });
                    }
                    Some(i) => parts[i] = Some(Part::Value(self.value(depth + 1)?)),
                    None => {
                        self.skip_value(depth + 1)?;
                    }
                }
                if !self.separator()? {
                    break;
                }
            }
        }
        self.source = Some(parts);
        Ok(())
    }

    fn is_image_name(&self, name: &Bound<'py, PyString>) -> bool {
        let [_, _, before, after, ..] = &self.owner.names;
        name.is(before) || name.is(after) || matches!(name.to_str(), Ok("before" | "after"))
    }

    fn is_json_column(&self, name: &Bound<'py, PyString>) -> Read<bool> {
        Ok(holds(&self.scalars, name)? || holds(&self.arrays, name)?)
    }

    /// A json/jsonb column's value (`start`: just after its ':'; `pos`: at the value): None for null,
    /// else its text up to the next separator; a json[]/jsonb[] list as the list of its items' texts.
    fn json_column(&mut self, name: &Bound<'py, PyString>, start: usize, depth: usize) -> Read<Bound<'py, PyAny>> {
        let begin = self.pos;
        let kind = self.skip_value(depth + 1)?;
        self.skip_ws();
        if kind == Kind::Null {
            return Ok(self.py.None().into_bound(self.py));
        }
        if holds(&self.scalars, name)? {
            return self.json_text(start, self.pos);
        }
        if kind != Kind::List {
            let end = self.pos;
            self.pos = begin;
            let value = self.value(depth + 1)?;
            self.pos = end;
            return Ok(value);
        }
        // The items of the list, each as its text.
        let end = self.pos;
        self.pos = begin + 1;
        let items = PyList::empty(self.py);
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos = end;
            return Ok(items.into_any());
        }
        self.pos = begin;
        loop {
            let item_start = self.pos + 1; // just after '[' or ','
            self.pos = item_start;
            self.skip_ws();
            let kind = self.skip_value(depth + 2)?;
            self.skip_ws();
            if kind == Kind::Null {
                items.append(self.py.None())?;
            } else {
                items.append(self.json_text(item_start, self.pos)?)?;
            }
            match self.peek() {
                Some(b']') => break,
                Some(b',') => {}
                _ => return Err(Stop::Fallback),
            }
        }
        self.pos = end;
        Ok(items.into_any())
    }

    fn json_text(&self, start: usize, end: usize) -> Read<Bound<'py, PyAny>> {
        let text = PyString::new(self.py, self.text(start, end));
        Ok(self.owner.json_text.bind(self.py).call1((text,))?)
    }

    fn text(&self, start: usize, end: usize) -> &'a str {
        // SAFETY: the whole input is valid UTF-8 (checked in read) and every position this reader
        // stops at is an ASCII byte or the input's end, so the slice is on character boundaries.
        let b: &'a [u8] = self.b;
        unsafe { std::str::from_utf8_unchecked(&b[start..end]) }
    }

    fn value(&mut self, depth: usize) -> Read<Bound<'py, PyAny>> {
        if depth > MAX_DEPTH {
            return Err(Stop::Fallback);
        }
        let py = self.py;
        match self.peek() {
            Some(b'{') => Ok(self.object(depth, false, false)?.into_any()),
            Some(b'[') => {
                self.pos += 1;
                let list = PyList::empty(py);
                self.skip_ws();
                if self.peek() == Some(b']') {
                    self.pos += 1;
                    return Ok(list.into_any());
                }
                loop {
                    list.append(self.value(depth + 1)?)?;
                    self.skip_ws();
                    match self.peek() {
                        Some(b',') => {
                            self.pos += 1;
                            self.skip_ws();
                        }
                        Some(b']') => {
                            self.pos += 1;
                            return Ok(list.into_any());
                        }
                        _ => return Err(Stop::Fallback),
                    }
                }
            }
            Some(b'"') => Ok(self.string()?.into_any()),
            Some(b't') => self.literal(b"true").map(|_| PyBool::new(py, true).to_owned().into_any()),
            Some(b'f') => self.literal(b"false").map(|_| PyBool::new(py, false).to_owned().into_any()),
            Some(b'n') => self.literal(b"null").map(|_| py.None().into_bound(py)),
            Some(b'-' | b'0'..=b'9') => {
                let (start, integer) = self.number()?;
                if integer {
                    if self.pos - start > MAX_INT_DIGITS {
                        return Err(Stop::Fallback);
                    }
                    let n: i64 = self.text(start, self.pos).parse().map_err(|_| Stop::Fallback)?;
                    Ok(n.into_pyobject(py)?.into_any())
                } else {
                    Ok(self.owner.decimal.bind(py).call1((self.text(start, self.pos),))?)
                }
            }
            _ => Err(Stop::Fallback),
        }
    }

    /// Past the value at `pos`, checked as strictly as `value` reads it, without building it.
    fn skip_value(&mut self, depth: usize) -> Read<Kind> {
        if depth > MAX_DEPTH {
            return Err(Stop::Fallback);
        }
        match self.peek() {
            Some(open @ (b'{' | b'[')) => {
                let close = if open == b'{' { b'}' } else { b']' };
                self.pos += 1;
                self.skip_ws();
                if self.peek() == Some(close) {
                    self.pos += 1;
                } else {
                    loop {
                        if open == b'{' {
                            if self.peek() != Some(b'"') {
                                return Err(Stop::Fallback);
                            }
                            self.skip_string()?;
                            self.skip_ws();
                            self.expect(b':')?;
                            self.skip_ws();
                        }
                        self.skip_value(depth + 1)?;
                        self.skip_ws();
                        match self.peek() {
                            Some(b',') => {
                                self.pos += 1;
                                self.skip_ws();
                            }
                            Some(c) if c == close => {
                                self.pos += 1;
                                break;
                            }
                            _ => return Err(Stop::Fallback),
                        }
                    }
                }
                Ok(if open == b'[' { Kind::List } else { Kind::Other })
            }
            Some(b'"') => self.skip_string().map(|_| Kind::Other),
            Some(b't') => self.literal(b"true").map(|_| Kind::Other),
            Some(b'f') => self.literal(b"false").map(|_| Kind::Other),
            Some(b'n') => self.literal(b"null").map(|_| Kind::Null),
            Some(b'-' | b'0'..=b'9') => {
                let (start, integer) = self.number()?;
                if integer && self.pos - start > MAX_INT_DIGITS {
                    return Err(Stop::Fallback); // the Python reader's limits on integer digits apply
                }
                Ok(Kind::Other)
            }
            _ => Err(Stop::Fallback),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Read<()> {
        if self.b[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(Stop::Fallback)
        }
    }

    /// Past a JSON number at `pos`: (its start, whether it is an integer). Standard JSON only.
    fn number(&mut self) -> Read<(usize, bool)> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(Stop::Fallback),
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(Stop::Fallback);
            }
            self.digits();
            integer = false;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(Stop::Fallback);
            }
            self.digits();
            integer = false;
        }
        Ok((start, integer))
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    /// Past the string at `pos` ('"'): (its content's end, whether it has escapes).
    fn skip_string(&mut self) -> Read<(usize, bool)> {
        self.pos += 1;
        let mut escaped = false;
        loop {
            self.pos += plain_run(&self.b[self.pos.min(self.b.len())..]);
            match self.peek() {
                Some(b'"') => {
                    let end = self.pos;
                    self.pos += 1;
                    return Ok((end, escaped));
                }
                Some(b'\\') => {
                    escaped = true;
                    match self.b.get(self.pos + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.pos += 2,
                        Some(b'u') => {
                            let unit = self.hex4(self.pos + 2)?;
                            self.pos += 6;
                            if (0xD800..0xDC00).contains(&unit) {
                                // a high surrogate must be followed by a low one (else: the Python reader)
                                if self.b.get(self.pos) != Some(&b'\\') || self.b.get(self.pos + 1) != Some(&b'u') {
                                    return Err(Stop::Fallback);
                                }
                                let low = self.hex4(self.pos + 2)?;
                                if !(0xDC00..0xE000).contains(&low) {
                                    return Err(Stop::Fallback);
                                }
                                self.pos += 6;
                            } else if (0xDC00..0xE000).contains(&unit) {
                                return Err(Stop::Fallback);
                            }
                        }
                        _ => return Err(Stop::Fallback),
                    }
                }
                Some(0..=0x1F) | None => return Err(Stop::Fallback),
                Some(_) => self.pos += 1,
            }
        }
    }

    fn hex4(&self, at: usize) -> Read<u32> {
        let digits = self.b.get(at..at + 4).ok_or(Stop::Fallback)?;
        let text = std::str::from_utf8(digits).map_err(|_| Stop::Fallback)?;
        if !text.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(Stop::Fallback);
        }
        u32::from_str_radix(text, 16).map_err(|_| Stop::Fallback)
    }

    /// A string (a member name or a value), remembered if it is short: a name repeated on every
    /// record, and values repeated across records (a table's name, a transaction's commit LSN and
    /// time, a status) are then one object, made and freed once rather than per record.
    fn string(&mut self) -> Read<Bound<'py, PyString>> {
        let start = self.pos + 1;
        let (end, escaped) = self.skip_string()?;
        let b: &'a [u8] = self.b;
        let raw = &b[start..end];
        if escaped {
            return Ok(PyString::new(self.py, &unescape(raw)));
        }
        let text = self.text(start, end);
        let py = self.py;
        let Some(strings) = self.strings.as_deref_mut().filter(|_| raw.len() <= MAX_CACHED_STRING) else {
            return Ok(PyString::new(py, text));
        };
        let slot = &mut strings[(short_hash(raw) as usize) % STRING_SLOTS];
        if let Some(cached) = slot {
            if &cached.bytes[..cached.len as usize] == raw {
                return Ok(cached.string.bind(py).clone());
            }
        }
        let string = PyString::new(py, text);
        let mut bytes = [0u8; MAX_CACHED_STRING];
        bytes[..raw.len()].copy_from_slice(raw);
        *slot = Some(CachedString { len: raw.len() as u8, bytes, string: string.clone().unbind() });
        Ok(string)
    }
}

/// The length of the run of plain string content at the start of `b`: up to the first '"', '\\' or
/// control character. Eight bytes at a time: a byte is flagged in a word by the borrow of a
/// subtraction, and the lowest flagged byte is always a true one (a false flag only ever sits above
/// a true one).
fn plain_run(b: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v;
    let mut i = 0;
    while let Some(word) = b.get(i..i + 8) {
        let x = u64::from_le_bytes(word.try_into().unwrap());
        let below_space = x.wrapping_sub(ONES * 0x20) & !x;
        let flagged = (below_space | zero_byte(x ^ (ONES * b'"' as u64)) | zero_byte(x ^ (ONES * b'\\' as u64))) & HIGHS;
        if flagged != 0 {
            return i + (flagged.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i + b[i..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20).unwrap_or(b.len() - i)
}

/// The text of a string's content with escapes (checked by skip_string: every \u pairs up).
fn unescape(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        if c != b'\\' {
            let run = raw[i..].iter().position(|&c| c == b'\\').map_or(raw.len(), |n| i + n);
            out.push_str(std::str::from_utf8(&raw[i..run]).expect("valid UTF-8 between escapes"));
            i = run;
            continue;
        }
        let hex = |at: usize| u32::from_str_radix(std::str::from_utf8(&raw[at..at + 4]).unwrap(), 16).unwrap();
        match raw[i + 1] {
            b'u' => {
                let unit = hex(i + 2);
                i += 6;
                let code = if (0xD800..0xDC00).contains(&unit) {
                    let low = hex(i + 2);
                    i += 6;
                    0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                } else {
                    unit
                };
                out.push(char::from_u32(code).expect("a checked code point"));
            }
            other => {
                out.push(match other {
                    b'b' => '\u{8}',
                    b'f' => '\u{c}',
                    b'n' => '\n',
                    b'r' => '\r',
                    b't' => '\t',
                    c => c as char, // '"', '\\', '/'
                });
                i += 2;
            }
        }
    }
    out
}

fn holds(set: &Option<Bound<'_, PyFrozenSet>>, name: &Bound<'_, PyString>) -> PyResult<bool> {
    match set {
        Some(set) if !set.is_empty() => set.contains(name),
        _ => Ok(false),
    }
}

/// A hash of a short string (at most MAX_CACHED_STRING bytes) from its length and its first and last
/// eight bytes (overlapping when shorter than sixteen): a few instructions, not a step per byte.
fn short_hash(bytes: &[u8]) -> u64 {
    let n = bytes.len();
    let (first, last) = if n >= 8 {
        (u64::from_le_bytes(bytes[..8].try_into().unwrap()), u64::from_le_bytes(bytes[n - 8..].try_into().unwrap()))
    } else {
        let mut word = [0u8; 8];
        word[..n].copy_from_slice(bytes);
        (u64::from_le_bytes(word), 0)
    };
    let h = (first ^ (n as u64).rotate_left(56)).wrapping_mul(0x9E3779B97F4A7C15) ^ last.wrapping_mul(0xC2B2AE3D27D4EB4F);
    h ^ (h >> 29)
}

/// An LSN in the form cdc writes it (1 to 8 hex digits, '/', 1 to 8 hex digits) -> its value;
/// None for anything else (cdc.lsn.parse_lsn then reads it or says what is wrong).
fn lsn_value(text: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
    let Ok(text) = text.cast_exact::<PyString>() else { return Ok(None) };
    Ok(lsn_bytes(text.to_str()?.as_bytes()))
}

/// lsn_value of a source member as read (lean_source).
fn part_lsn(part: &Part<'_>) -> PyResult<Option<u64>> {
    match part {
        Part::Lsn(value) => Ok(Some(*value)),
        Part::Value(value) => lsn_value(value),
    }
}

/// The LSN's value from its text's bytes (see lsn_value).
fn lsn_bytes(text: &[u8]) -> Option<u64> {
    let slash = text.iter().position(|&c| c == b'/')?;
    let half = |part: &[u8]| -> Option<u64> {
        if !(1..=8).contains(&part.len()) {
            return None;
        }
        part.iter().try_fold(0u64, |n, &c| Some(n << 4 | (c as char).to_digit(16)? as u64))
    };
    Some(half(&text[..slash])? << 32 | half(&text[slash + 1..])?)
}
