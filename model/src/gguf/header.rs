//! Explaining why a GGUF file could not be opened.
//!
//! candle's `Content::read` fails on the whole file with a terse message ("unknown dtype for
//! tensor 16", "failed to fill whole buffer") when the file is not GGUF, is cut short, or holds
//! a tensor type candle cannot decode (the i-quants, for instance). This module re-walks the
//! header on its own, only after such a failure, to turn that into one actionable line:
//! "not a GGUF file", "truncated ...", or "tensor `x` uses GGML type 16 (IQ2_XXS), which is not
//! supported". It never allocates more than one string at a time and never trusts a length
//! field beyond the file size, so corrupt input cannot make it panic or blow up memory.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::Error;

/// GGML tensor types candle 0.11 can decode (ids from ggml.h), in id order.
pub(crate) const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

fn type_supported(id: u32) -> bool {
    matches!(id, 0..=3 | 6..=15 | 30)
}

/// ggml.h names, for messages only.
fn type_name(id: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// On-disk size of a fixed-size GGUF metadata value type.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Why the walk stopped.
enum Stop {
    /// The file ended before the header did.
    Eof,
    /// A precise diagnosis.
    Found(String),
    /// An I/O error other than end of file.
    Io(std::io::Error),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Stop::Eof
        } else {
            Stop::Io(e)
        }
    }
}

struct Walker {
    r: BufReader<File>,
    /// Bytes consumed so far; tracked by hand so that skipping can use the buffered
    /// `seek_relative` and every length can be checked against what is left.
    pos: u64,
    len: u64,
    /// GGUF v1 uses 32-bit lengths and counts, v2/v3 use 64-bit ones.
    wide: bool,
}

impl Walker {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], Stop> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, Stop> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }

    fn length(&mut self) -> Result<u64, Stop> {
        if self.wide {
            self.bytes::<8>().map(u64::from_le_bytes)
        } else {
            self.u32().map(u64::from)
        }
    }

    fn skip(&mut self, n: u64) -> Result<(), Stop> {
        if n > self.len.saturating_sub(self.pos) {
            return Err(Stop::Eof);
        }
        // `n` fits in what is left of the file, so it fits in an i64.
        self.r.seek_relative(n as i64)?;
        self.pos += n;
        Ok(())
    }

    fn string(&mut self) -> Result<String, Stop> {
        let n = self.length()?;
        if n > self.len.saturating_sub(self.pos) {
            return Err(Stop::Eof);
        }
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf)?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn skip_value(&mut self, key: &str, ty: u32, depth: usize) -> Result<(), Stop> {
        if let Some(size) = fixed_size(ty) {
            return self.skip(size);
        }
        match ty {
            8 => {
                let n = self.length()?;
                self.skip(n)
            }
            9 if depth < 8 => {
                let elem = self.u32()?;
                let count = self.length()?;
                if let Some(size) = fixed_size(elem) {
                    return self.skip(count.saturating_mul(size));
                }
                for _ in 0..count {
                    self.skip_value(key, elem, depth + 1)?;
                }
                Ok(())
            }
            _ => Err(Stop::Found(format!(
                "corrupt GGUF header: metadata key `{key}` has unknown value type {ty}"
            ))),
        }
    }

    fn walk(&mut self) -> Result<(), Stop> {
        let mut magic = [0u8; 4];
        self.r.read_exact(&mut magic)?;
        if &magic != b"GGUF" {
            return Err(Stop::Found(format!(
                "not a GGUF file (it starts with bytes {:02x} {:02x} {:02x} {:02x}, expected \"GGUF\")",
                magic[0], magic[1], magic[2], magic[3]
            )));
        }
        let version = self.u32()?;
        if !(1..=3).contains(&version) {
            return Err(Stop::Found(format!(
                "unsupported GGUF version {version} (supported: 1, 2, 3)"
            )));
        }
        self.wide = version >= 2;
        let n_tensors = self.length()?;
        let n_kv = self.length()?;
        for _ in 0..n_kv {
            let key = self.string()?;
            let ty = self.u32()?;
            self.skip_value(&key, ty, 0)?;
        }
        for _ in 0..n_tensors {
            let name = self.string()?;
            let n_dims = self.u32()?;
            if n_dims > 4 {
                return Err(Stop::Found(format!(
                    "corrupt GGUF header: tensor `{name}` has {n_dims} dimensions (at most 4)"
                )));
            }
            self.skip(u64::from(n_dims) * if self.wide { 8 } else { 4 })?;
            let ty = self.u32()?;
            if !type_supported(ty) {
                return Err(Stop::Found(format!(
                    "tensor `{name}` uses GGML type {ty} ({}), which is not supported; \
                     supported types: {SUPPORTED_TYPES}",
                    type_name(ty)
                )));
            }
            self.skip(8)?;
        }
        Ok(())
    }
}

/// Turn a failed `Content::read` into an error that says what is wrong with the file.
pub(crate) fn diagnose(path: &Path, candle_err: candle_core::Error) -> Error {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return Error::io(path, e),
    };
    let len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return Error::io(path, e),
    };
    let mut walker = Walker {
        r: BufReader::new(file),
        pos: 0,
        len,
        wide: true,
    };
    let reason = match walker.walk() {
        Err(Stop::Found(reason)) => reason,
        Err(Stop::Eof) if len < 4 => {
            format!("not a GGUF file (only {len} bytes)")
        }
        Err(Stop::Eof) => {
            format!("truncated GGUF file: it ends inside the header ({len} bytes in all)")
        }
        Err(Stop::Io(e)) => return Error::io(path, e),
        Ok(()) => format!("could not read the GGUF header: {candle_err}"),
    };
    Error::weights(path, reason)
}
