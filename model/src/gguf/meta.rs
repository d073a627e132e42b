//! Typed, error-reporting access to GGUF metadata.
//!
//! GGUF stores every metadata value with its own integer width (`u32` here, `u64` there,
//! depending on the tool that wrote the file), so the getters accept any integer width that
//! fits. Every error names the key, because "missing `llama.block_count`" is actionable and
//! "not a u32" is not.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;

use crate::{Error, Result};

/// Borrowed view of a GGUF file's metadata plus its path for error messages.
pub(crate) struct Meta<'a> {
    map: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl<'a> Meta<'a> {
    pub fn new(map: &'a HashMap<String, Value>, path: &'a Path) -> Self {
        Self { map, path }
    }

    pub fn path(&self) -> &'a Path {
        self.path
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn missing(&self, key: &str) -> Error {
        Error::weights(self.path, format!("missing GGUF metadata key `{key}`"))
    }

    fn mistyped(&self, key: &str, value: &Value, expected: &str) -> Error {
        Error::weights(
            self.path,
            format!(
                "GGUF metadata key `{key}` has type {:?}, expected {expected}",
                value.value_type()
            ),
        )
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.mistyped(key, v, "a string")),
        }
    }

    pub fn str(&self, key: &str) -> Result<&'a str> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => as_u64(v)
                .map(Some)
                .ok_or_else(|| self.mistyped(key, v, "a non-negative integer")),
        }
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?.ok_or_else(|| self.missing(key))
    }

    /// A count or size that must be positive (a zero would make shapes degenerate).
    pub fn usize_nonzero(&self, key: &str) -> Result<usize> {
        let v = self.u64(key)?;
        if v == 0 {
            return Err(Error::weights(
                self.path,
                format!("GGUF metadata key `{key}` is 0"),
            ));
        }
        usize::try_from(v).map_err(|_| {
            Error::weights(
                self.path,
                format!("GGUF metadata key `{key}` = {v} is too large"),
            )
        })
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.mistyped(key, v, "a float")),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.mistyped(key, v, "a bool")),
        }
    }

    pub fn opt_array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a.as_slice())),
            Some(v) => Err(self.mistyped(key, v, "an array")),
        }
    }

    pub fn array(&self, key: &str) -> Result<&'a [Value]> {
        self.opt_array(key)?.ok_or_else(|| self.missing(key))
    }

    /// An array whose elements must all be strings.
    pub fn str_array(&self, key: &str) -> Result<Vec<&'a str>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.mistyped(&format!("{key}[{i}]"), v, "a string")),
            })
            .collect()
    }

    /// An optional array of integers (any width, signed allowed).
    pub fn opt_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(arr) = self.opt_array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .enumerate()
            .map(|(i, v)| {
                as_i64(v).ok_or_else(|| self.mistyped(&format!("{key}[{i}]"), v, "an integer"))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An optional array of floats.
    pub fn opt_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(arr) = self.opt_array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                v => Err(self.mistyped(&format!("{key}[{i}]"), v, "a float")),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U64(x) => Some(*x),
        other => as_i64(other).and_then(|x| u64::try_from(x).ok()),
    }
}
