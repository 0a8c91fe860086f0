//! GGUF files (llama.cpp's single-file model format, versions 2 and 3).
//!
//! | piece | where |
//! | --- | --- |
//! | header, metadata, tensor infos, the mapped data | this file |
//! | GGML block formats → f32 | [`dequant`] |
//! | llama tensors → [`WeightKey`](crate::model::weights::WeightKey), config from metadata | [`llama`] |
//!
//! Layout of a file, all little-endian: the magic `GGUF`, a `u32` version, a
//! `u64` tensor count, a `u64` metadata count; the metadata key/values; one
//! info per tensor (name, dimensions listed fastest first, type, offset into
//! the data section); padding to `general.alignment` (32 by default); the
//! data section. The file is memory-mapped and tensors are decoded from the
//! map only when asked for.

pub mod dequant;
pub mod llama;
#[cfg(test)]
pub(crate) mod write;

use crate::error::{Error, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use dequant::GgmlType;
pub use llama::GgufSource;

/// The alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of
    /// any width (writers disagree on widths: u32 here, i32 or u64 there).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Where one tensor lies in the data section and how it is encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, fastest first: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// `(rows, row length)`: every dimension but the first counts as rows.
    pub fn rows_cols(&self) -> (u64, u64) {
        let cols = self.dims.first().copied().unwrap_or(1);
        (self.numel() / cols.max(1), cols)
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    map: Mmap,
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian reader over the header.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| {
            Error::BadModel(format!(
                "GGUF header ends early: {n} bytes wanted at offset {} of {}",
                self.at,
                self.buf.len()
            ))
        })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items of at least `min_size` bytes each, refused when the
    /// rest of the file could not hold them (a corrupt count must not make
    /// us allocate terabytes).
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.at) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(Error::BadModel(format!(
                "GGUF {what} count {n} cannot fit in the {left} bytes left"
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(Error::BadModel(format!("GGUF bool of value {b}"))),
            },
            8 => Value::String(self.string()?),
            9 if depth < 4 => {
                let elem = self.u32()?;
                let n = self.count(1, "array length")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(v)
            }
            9 => return Err(Error::BadModel("GGUF arrays nested too deep".into())),
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            t => {
                return Err(Error::BadModel(format!(
                    "GGUF metadata type {t} is unknown"
                )));
            }
        })
    }

    fn tensor_info(&mut self) -> Result<TensorInfo> {
        let name = self.string()?;
        let n_dims = self.u32()?;
        if n_dims > 4 {
            return Err(Error::BadModel(format!("{name}: {n_dims} dimensions")));
        }
        let dims = (0..n_dims)
            .map(|_| self.u64())
            .collect::<Result<Vec<_>>>()?;
        let ty = GgmlType::from_id(self.u32()?);
        let offset = self.u64()?;
        Ok(TensorInfo {
            name,
            dims,
            ty,
            offset,
        })
    }
}

fn map(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the model file is opened read-only; if another process
    // truncates it while mapped we may fault, as any reader of a file would.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let map = map(path)?;
        let at = |e: Error| match e {
            Error::BadModel(m) => Error::BadModel(format!("{}: {m}", path.display())),
            Error::UnsupportedModel(m) => {
                Error::UnsupportedModel(format!("{}: {m}", path.display()))
            }
            other => other,
        };
        Self::parse(map, path).map_err(at)
    }

    fn parse(map: Mmap, path: &Path) -> Result<GgufFile> {
        let mut c = Cursor { buf: &map, at: 0 };
        let magic = c.take(4)?;
        if magic != b"GGUF" {
            return Err(Error::BadModel(format!(
                "not a GGUF file (magic {magic:02x?})"
            )));
        }
        let version = c.u32()?;
        if (1..=3).contains(&version.swap_bytes()) {
            return Err(Error::UnsupportedModel(
                "a big-endian GGUF file (only little-endian is supported)".into(),
            ));
        }
        if !(2..=3).contains(&version) {
            return Err(Error::UnsupportedModel(format!(
                "GGUF version {version} (2 and 3 are supported)"
            )));
        }
        // A tensor info takes at least 8 + 4 + 4 + 8 bytes, a key/value 8 + 4 + 1.
        let n_tensors = c.count(24, "tensor")?;
        let n_kv = c.count(13, "metadata")?;
        let mut metadata = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let tensors = (0..n_tensors)
            .map(|_| c.tensor_info())
            .collect::<Result<Vec<_>>>()?;
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| Error::BadModel(format!("general.alignment {v:?}")))?,
        };
        let data_start = (c.at as u64).next_multiple_of(alignment);
        let data_len = (map.len() as u64).saturating_sub(data_start);
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(Error::BadModel(format!("tensor {} appears twice", t.name)));
            }
            if !t.offset.is_multiple_of(alignment) {
                return Err(Error::BadModel(format!(
                    "{}: offset {} is not a multiple of the alignment {alignment}",
                    t.name, t.offset
                )));
            }
            // A block never straddles two rows.
            if let Some((vals, _)) = t.ty.block()
                && !t.rows_cols().1.is_multiple_of(vals as u64)
            {
                return Err(Error::BadModel(format!(
                    "{}: rows of {} values are not whole {} blocks of {vals}",
                    t.name,
                    t.rows_cols().1,
                    t.ty.name()
                )));
            }
            // Sizes of types we cannot decode are unknown; those tensors are
            // refused when read.
            if let Some(bytes) = t.ty.byte_size(t.numel())
                && t.offset.checked_add(bytes).is_none_or(|end| end > data_len)
            {
                return Err(Error::BadModel(format!(
                    "{}: {bytes} bytes at offset {} run past the data section ({data_len} bytes)",
                    t.name, t.offset
                )));
            }
        }
        Ok(GgufFile {
            path: path.to_owned(),
            version,
            metadata,
            tensors,
            by_name,
            data_start: data_start as usize,
            map,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let n =
            t.ty.byte_size(t.numel())
                .ok_or_else(|| self.unsupported_type(t))?;
        let start = self.data_start + t.offset as usize;
        Ok(&self.map[start..start + n as usize])
    }

    /// A tensor decoded to f32, in its stored order (`dims[0]` fastest).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| Error::BadModel(format!("{}: no tensor {name}", self.path.display())))?;
        let bytes = self.tensor_bytes(t)?;
        dequant::to_f32(t.ty, bytes).ok_or_else(|| self.unsupported_type(t))
    }

    /// Writes every tensor, decoded to f32, to one safetensors file under
    /// its GGUF name, in numpy order (`dims` reversed) and unpermuted: a
    /// check of this reader against other GGUF readers. Returns the count.
    pub fn dump_f32(&self, out: &Path) -> Result<usize> {
        let decoded = self
            .tensors
            .iter()
            .map(|t| {
                let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
                Ok((t.name.clone(), shape, self.dequantize(&t.name)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let views = decoded
            .iter()
            .map(|(name, shape, data)| {
                let bytes = bytemuck::cast_slice::<f32, u8>(data);
                let v = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    bytes,
                )
                .map_err(|e| Error::BadModel(format!("{name}: {e}")))?;
                Ok((name.clone(), v))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, None, out)
            .map_err(|e| Error::BadModel(format!("{}: {e}", out.display())))?;
        Ok(decoded.len())
    }

    fn unsupported_type(&self, t: &TensorInfo) -> Error {
        Error::UnsupportedModel(format!(
            "{}: tensor {} has type {} (supported: {})",
            self.path.display(),
            t.name,
            t.ty.name(),
            GgmlType::SUPPORTED.map(|t| t.name()).join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::write::{Tensor, f32_tensor, gguf};
    use super::*;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("tacflow-{}-{name}.gguf", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn all_kinds() -> Vec<(&'static str, Value)> {
        vec![
            ("general.architecture", Value::String("llama".into())),
            ("u8", Value::U8(200)),
            ("i8", Value::I8(-3)),
            ("u16", Value::U16(65_000)),
            ("i16", Value::I16(-30_000)),
            ("u32", Value::U32(4_000_000_000)),
            ("i32", Value::I32(-7)),
            ("u64", Value::U64(1 << 40)),
            ("i64", Value::I64(-(1 << 40))),
            ("f32", Value::F32(1.5e-5)),
            ("f64", Value::F64(-2.25)),
            ("bool", Value::Bool(true)),
            ("empty", Value::String(String::new())),
            (
                "strings",
                Value::Array(vec![Value::String("a".into()), Value::String("éλ".into())]),
            ),
            (
                "nested",
                Value::Array(vec![
                    Value::Array(vec![Value::I32(1), Value::I32(-2)]),
                    Value::Array(vec![Value::I32(3)]),
                ]),
            ),
        ]
    }

    #[test]
    fn metadata_and_tensors_round_trip() {
        for align in [32, 64] {
            let mut meta = all_kinds();
            if align != 32 {
                meta.push(("general.alignment", Value::U32(align as u32)));
            }
            let a: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
            let b = [7.0f32];
            let tensors = [
                f32_tensor("a", vec![3, 2], &a),
                f32_tensor("b.weight", vec![1], &b),
            ];
            let p = temp_file(&format!("meta{align}"), &gguf(&meta, &tensors, align));
            let f = GgufFile::open(&p).unwrap();
            assert_eq!(f.version, 3);
            for (k, v) in &meta {
                assert_eq!(f.get(k), Some(v), "{k}");
            }
            assert_eq!(f.get("u8").unwrap().as_u64(), Some(200));
            assert_eq!(f.get("i32").unwrap().as_u64(), None);
            assert_eq!(f.get("f32").unwrap().as_f64(), Some(1.5e-5f32 as f64));
            let ta = f.tensor_info("a").unwrap();
            assert_eq!((ta.dims.clone(), ta.rows_cols()), (vec![3, 2], (2, 3)));
            assert_eq!(f.dequantize("a").unwrap(), a);
            assert_eq!(f.dequantize("b.weight").unwrap(), b);
            assert_eq!(f.tensor_info("b.weight").unwrap().offset % align, 0);
            std::fs::remove_file(&p).unwrap();
        }
    }

    #[test]
    fn damaged_files_are_refused() {
        let t = [f32_tensor("a", vec![4], &[1.0; 4])];
        let good = gguf(&all_kinds(), &t, 32);
        let err = |bytes: &[u8], name: &str| {
            let p = temp_file(name, bytes);
            let e = GgufFile::open(&p).unwrap_err().to_string();
            std::fs::remove_file(&p).unwrap();
            e
        };
        assert!(err(&good[..good.len() - 1], "short").contains("run past"));
        assert!(err(&good[..40], "cut").contains("cannot fit"));
        assert!(err(&good[..6], "stub").contains("ends early"));
        assert!(err(b"GGML....", "magic").contains("not a GGUF"));
        let mut v1 = good.clone();
        v1[4] = 1;
        assert!(err(&v1, "v1").contains("version 1"));
        let mut big = good.clone();
        big[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(err(&big, "big").contains("big-endian"));
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&huge, "huge").contains("metadata count"));
        let q = Tensor {
            name: "q".into(),
            dims: vec![32],
            ty: GgmlType::Other(19),
            bytes: vec![0; 64],
        };
        let p = temp_file("iq", &gguf(&[], &[q], 32));
        let f = GgufFile::open(&p).unwrap();
        let e = f.dequantize("q").unwrap_err().to_string();
        assert!(e.contains("type 19") && e.contains("Q4_1"), "{e}");
        std::fs::remove_file(&p).unwrap();
    }
}
