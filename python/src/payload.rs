//! Task payloads for calls with plain scalar arguments, written here instead
//! of by `pickle.dumps`: `client.map` over 100k numbers otherwise spends most
//! of its time in per-task Python. The bytes are an ordinary pickle (protocol
//! 5) of `(CALL, function_bytes, args, {})`, which the worker loads like any
//! other payload; the key is `prefix + md5(payload)`, so equal calls share a
//! key (pure) whether they come from `submit` or `map`.

use md5::{Digest, Md5};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyString, PyTuple};

/// The worker's task kind for a function call (`rdask.worker.CALL`).
const CALL: u8 = 1;

// Pickle opcodes used here (see `pickletools`).
const PROTO: u8 = 0x80;
const MARK: u8 = b'(';
const TUPLE: u8 = b't';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const EMPTY_TUPLE: u8 = b')';
const EMPTY_DICT: u8 = b'}';
const STOP: u8 = b'.';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const BININT: u8 = b'J';
const LONG1: u8 = 0x8a;
const BINFLOAT: u8 = b'G';
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE: u8 = b'X';
const SHORT_BINBYTES: u8 = b'C';
const BINBYTES: u8 = b'B';

/// Writes one argument; false when it is not a plain scalar (the caller then
/// falls back to `pickle`). Checks exact types: a subclass of int or str may
/// pickle differently (and carry state), so it is not a plain scalar.
fn write_scalar(out: &mut Vec<u8>, x: &Bound<'_, PyAny>) -> bool {
    if x.is_none() {
        out.push(NONE);
    } else if let Ok(b) = x.cast_exact::<PyBool>() {
        out.push(if b.is_true() { NEWTRUE } else { NEWFALSE });
    } else if let Ok(i) = x.cast_exact::<PyInt>() {
        let Ok(v) = i.extract::<i64>() else { return false };
        match v {
            0..=0xff => out.extend_from_slice(&[BININT1, v as u8]),
            0x100..=0xffff => {
                out.push(BININT2);
                out.extend_from_slice(&(v as u16).to_le_bytes());
            }
            _ if i32::try_from(v).is_ok() => {
                out.push(BININT);
                out.extend_from_slice(&(v as i32).to_le_bytes());
            }
            _ => {
                // Eight bytes of two's complement, little-endian: pickle
                // reads any length, so no need for the minimal one.
                out.extend_from_slice(&[LONG1, 8]);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    } else if let Ok(f) = x.cast_exact::<PyFloat>() {
        out.push(BINFLOAT);
        out.extend_from_slice(&f.value().to_be_bytes());
    } else if let Ok(s) = x.cast_exact::<PyString>() {
        let Ok(s) = s.to_str() else { return false }; // lone surrogates
        write_sized(out, s.as_bytes(), SHORT_BINUNICODE, BINUNICODE);
    } else if let Ok(b) = x.cast_exact::<PyBytes>() {
        write_sized(out, b.as_bytes(), SHORT_BINBYTES, BINBYTES);
    } else {
        return false;
    }
    true
}

fn write_sized(out: &mut Vec<u8>, data: &[u8], short: u8, long: u8) {
    if data.len() < 256 {
        out.extend_from_slice(&[short, data.len() as u8]);
    } else {
        out.push(long);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(data);
}

/// Builds payloads for calls of one function; reuses its buffer.
pub(crate) struct ScalarCalls<'a> {
    head: Vec<u8>,
    buf: Vec<u8>,
    prefix: &'a str,
}

impl<'a> ScalarCalls<'a> {
    /// None when the function bytes are too big for this encoding (4 GiB).
    pub(crate) fn new(function: &[u8], prefix: &'a str) -> Option<Self> {
        if function.len() > u32::MAX as usize {
            return None;
        }
        let mut head = vec![PROTO, 5, MARK, BININT1, CALL];
        write_sized(&mut head, function, SHORT_BINBYTES, BINBYTES);
        Some(ScalarCalls { head, buf: Vec::new(), prefix })
    }

    /// (payload, key) for a call with these positional arguments, or None
    /// when one of them is not a plain scalar.
    pub(crate) fn call(&mut self, args: &[Bound<'_, PyAny>]) -> Option<(Vec<u8>, String)> {
        let buf = &mut self.buf;
        buf.clear();
        buf.extend_from_slice(&self.head);
        if args.len() > 3 {
            buf.push(MARK);
        }
        for a in args {
            if !write_scalar(buf, a) {
                return None;
            }
        }
        buf.push(match args.len() {
            0 => EMPTY_TUPLE,
            1 => TUPLE1,
            2 => TUPLE2,
            3 => TUPLE3,
            _ => TUPLE,
        });
        buf.extend_from_slice(&[EMPTY_DICT, TUPLE, STOP]);
        let digest = Md5::digest(&buf[..]);
        let mut key = String::with_capacity(self.prefix.len() + 33);
        key.push_str(self.prefix);
        key.push('-');
        for b in digest {
            key.push(char::from_digit((b >> 4) as u32, 16).unwrap());
            key.push(char::from_digit((b & 15) as u32, 16).unwrap());
        }
        Some((buf.clone(), key))
    }
}

/// `(payload, key)` for `func(*args)` with plain scalar arguments, or None
/// (pickle it in Python then). `function` is the cloudpickled function,
/// `prefix` the key's name part.
#[pyfunction]
pub fn scalar_call<'py>(
    py: Python<'py>,
    function: &[u8],
    prefix: &str,
    args: &Bound<'py, PyTuple>,
) -> Option<(Bound<'py, PyBytes>, String)> {
    let mut calls = ScalarCalls::new(function, prefix)?;
    let args: Vec<Bound<'py, PyAny>> = args.iter().collect();
    calls.call(&args).map(|(payload, key)| (PyBytes::new(py, &payload), key))
}
