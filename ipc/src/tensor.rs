//! Tensor references: where in a registered region a tensor lives.
//!
//! A reference is checked once against its region ([`TensorRef::resolve`])
//! before any memory is touched: dtype known, offset aligned, every element
//! inside the region, all arithmetic overflow-checked. What comes out is a
//! [`TensorView`] whose element offsets are then safe to use.

use crate::error::{ErrorCode, ErrorReply};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
    I32,
    I64,
    U8,
}

impl DType {
    pub fn size(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::Bf16 => 2,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }
}

/// `{region_id, offset, dtype, shape, strides?}`. Strides count elements and
/// default to row-major contiguous.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorRef {
    pub region_id: u64,
    pub offset: u64,
    pub dtype: DType,
    pub shape: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strides: Option<Vec<u64>>,
}

/// A tensor reference that has been checked against its region.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorView {
    pub offset: u64,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub strides: Vec<u64>,
}

/// Most dimensions a tensor may have; a guard against hostile headers.
pub const MAX_RANK: usize = 8;

fn oob(msg: impl Into<String>) -> ErrorReply {
    ErrorReply::new(ErrorCode::OutOfBounds, msg)
}

impl TensorRef {
    /// Row-major element strides for `shape`, or `None` on overflow.
    pub fn contiguous_strides(shape: &[u64]) -> Option<Vec<u64>> {
        let mut strides = vec![0u64; shape.len()];
        let mut acc: u64 = 1;
        for i in (0..shape.len()).rev() {
            strides[i] = acc;
            acc = acc.checked_mul(shape[i].max(1))?;
        }
        Some(strides)
    }

    /// Checks the reference against a region of `region_size` bytes and
    /// returns the view. Errors are the wire errors the client will read.
    pub fn resolve(&self, region_size: u64) -> Result<TensorView, ErrorReply> {
        if self.shape.len() > MAX_RANK {
            return Err(ErrorReply::new(
                ErrorCode::ShapeMismatch,
                "tensor has too many dimensions",
            )
            .with("rank", self.shape.len())
            .with("max_rank", MAX_RANK));
        }
        let strides = match &self.strides {
            Some(s) => {
                if s.len() != self.shape.len() {
                    return Err(ErrorReply::new(
                        ErrorCode::ShapeMismatch,
                        "strides and shape have different lengths",
                    )
                    .with("shape_rank", self.shape.len())
                    .with("strides_rank", s.len()));
                }
                s.clone()
            }
            None => Self::contiguous_strides(&self.shape)
                .ok_or_else(|| oob("tensor shape overflows 64-bit element counts"))?,
        };
        let esize = self.dtype.size();
        if !self.offset.is_multiple_of(esize) {
            return Err(ErrorReply::new(
                ErrorCode::OutOfBounds,
                "tensor offset is not aligned to its dtype",
            )
            .with("offset", self.offset)
            .with("dtype", self.dtype.name()));
        }
        let empty = self.shape.contains(&0);
        if !empty {
            // Highest element index, then its byte end; every step checked.
            let mut last: u64 = 0;
            for (&n, &s) in self.shape.iter().zip(&strides) {
                let term = (n - 1)
                    .checked_mul(s)
                    .ok_or_else(|| oob("tensor extent overflows"))?;
                last = last
                    .checked_add(term)
                    .ok_or_else(|| oob("tensor extent overflows"))?;
            }
            let end = last
                .checked_add(1)
                .and_then(|e| e.checked_mul(esize))
                .and_then(|b| b.checked_add(self.offset))
                .ok_or_else(|| oob("tensor extent overflows"))?;
            if end > region_size {
                return Err(oob("tensor reaches past the end of its region")
                    .with("region_id", self.region_id)
                    .with("end", end)
                    .with("region_size", region_size));
            }
        } else if self.offset > region_size {
            return Err(oob("tensor offset is past the end of its region")
                .with("offset", self.offset)
                .with("region_size", region_size));
        }
        Ok(TensorView {
            offset: self.offset,
            dtype: self.dtype,
            shape: self.shape.clone(),
            strides,
        })
    }
}

impl TensorView {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Byte offset of the element at `index` (one coordinate per dimension).
    /// The view was bounds-checked, so this cannot overflow for valid indices.
    pub fn byte_offset(&self, index: &[u64]) -> u64 {
        let el: u64 = index.iter().zip(&self.strides).map(|(i, s)| i * s).sum();
        self.offset + el * self.dtype.size()
    }

    /// Whether rows of the last dimension are contiguous (stride 1), which
    /// lets writers copy a row at a time.
    pub fn rows_contiguous(&self) -> bool {
        self.strides.last().is_none_or(|&s| s == 1)
    }

    /// Checks the shape against what the request needs.
    pub fn expect_shape(&self, what: &str, want: &[u64]) -> Result<(), ErrorReply> {
        if self.shape != want {
            return Err(ErrorReply::new(
                ErrorCode::ShapeMismatch,
                format!("{what}: expected shape {want:?}, got {:?}", self.shape),
            ));
        }
        Ok(())
    }

    pub fn expect_dtype(&self, what: &str, allowed: &[DType]) -> Result<(), ErrorReply> {
        if !allowed.contains(&self.dtype) {
            let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
            return Err(ErrorReply::new(
                ErrorCode::DtypeMismatch,
                format!(
                    "{what}: dtype {} is not one of {}",
                    self.dtype.name(),
                    names.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tref(offset: u64, dtype: DType, shape: Vec<u64>, strides: Option<Vec<u64>>) -> TensorRef {
        TensorRef {
            region_id: 1,
            offset,
            dtype,
            shape,
            strides,
        }
    }

    #[test]
    fn contiguous_fits_exactly() {
        let t = tref(16, DType::F32, vec![2, 3], None);
        let v = t.resolve(16 + 24).unwrap();
        assert_eq!(v.strides, vec![3, 1]);
        assert_eq!(v.byte_offset(&[1, 2]), 16 + 20);
        assert_eq!(t.resolve(16 + 23).unwrap_err().code, ErrorCode::OutOfBounds);
    }

    #[test]
    fn strided_view_checks_its_last_element() {
        // Rows of 3 inside rows of 10: last element at 1*10 + 2.
        let t = tref(0, DType::Bf16, vec![2, 3], Some(vec![10, 1]));
        assert!(t.resolve(13 * 2).is_ok());
        assert!(t.resolve(13 * 2 - 1).is_err());
    }

    #[test]
    fn misaligned_and_overflowing_refs_fail() {
        assert_eq!(
            tref(2, DType::F32, vec![1], None)
                .resolve(64)
                .unwrap_err()
                .code,
            ErrorCode::OutOfBounds
        );
        let huge = tref(0, DType::F32, vec![u64::MAX, 2], None);
        assert_eq!(
            huge.resolve(u64::MAX).unwrap_err().code,
            ErrorCode::OutOfBounds
        );
        let stride = tref(0, DType::F32, vec![3], Some(vec![u64::MAX / 2]));
        assert_eq!(
            stride.resolve(u64::MAX).unwrap_err().code,
            ErrorCode::OutOfBounds
        );
        let off = tref(u64::MAX - 3, DType::U8, vec![8], None);
        assert_eq!(
            off.resolve(u64::MAX).unwrap_err().code,
            ErrorCode::OutOfBounds
        );
    }

    #[test]
    fn empty_tensor_touches_nothing() {
        let t = tref(64, DType::F32, vec![0, 5], None);
        assert_eq!(t.resolve(64).unwrap().numel(), 0);
        assert!(tref(65, DType::U8, vec![0], None).resolve(64).is_err());
    }

    #[test]
    fn rank_and_stride_count_are_checked() {
        let deep = tref(0, DType::U8, vec![1; MAX_RANK + 1], None);
        assert_eq!(deep.resolve(1).unwrap_err().code, ErrorCode::ShapeMismatch);
        let bad = tref(0, DType::U8, vec![2, 2], Some(vec![1]));
        assert_eq!(bad.resolve(64).unwrap_err().code, ErrorCode::ShapeMismatch);
    }
}
