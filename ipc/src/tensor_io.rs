//! Whole tensors in and out of a host region, any rank, dtype and strides:
//! what `attention_step` reads (q, k, v) and writes (its output). Rows of
//! the last dimension are copied in one go when they are contiguous.

use crate::error::{ErrorCode, ErrorReply};
use crate::region::HostRegion;
use crate::tensor::{DType, TensorView};
use half::{bf16, f16};

fn not_float(dtype: DType) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::DtypeMismatch,
        format!("expected f32, f16 or bf16, got {}", dtype.name()),
    )
}

/// Every index of `shape` but the last, in row-major order.
fn outer_indices(shape: &[u64]) -> impl Iterator<Item = Vec<u64>> + '_ {
    let outer = &shape[..shape.len().saturating_sub(1)];
    let count: u64 = outer.iter().product();
    (0..count).map(move |mut i| {
        let mut idx = vec![0u64; shape.len()];
        for d in (0..outer.len()).rev() {
            idx[d] = i % outer[d];
            i /= outer[d];
        }
        idx
    })
}

impl HostRegion {
    /// The view's elements as f32, row-major. The view must have been
    /// resolved against this region.
    pub fn read_f32(&self, view: &TensorView) -> Result<Vec<f32>, ErrorReply> {
        let esize = view.dtype.size() as usize;
        if !matches!(view.dtype, DType::F32 | DType::F16 | DType::Bf16) {
            return Err(not_float(view.dtype));
        }
        let n = view.numel() as usize;
        let mut out = Vec::with_capacity(n);
        if n == 0 {
            return Ok(out);
        }
        let last = *view.shape.last().unwrap_or(&1) as usize;
        let contiguous = view.rows_contiguous();
        let mut buf = vec![0u8; if contiguous { last * esize } else { esize }];
        let shape = if view.shape.is_empty() {
            vec![1]
        } else {
            view.shape.clone()
        };
        for mut idx in outer_indices(&shape) {
            if contiguous {
                self.read_bytes(view.byte_offset(&idx), &mut buf)?;
                decode(view.dtype, &buf, &mut out);
            } else {
                for c in 0..last {
                    *idx.last_mut().expect("rank >= 1") = c as u64;
                    self.read_bytes(view.byte_offset(&idx), &mut buf)?;
                    decode(view.dtype, &buf, &mut out);
                }
            }
        }
        Ok(out)
    }

    /// Writes `data` (row-major, the view's element count) into the view,
    /// converting to its float dtype.
    pub fn write_f32(&self, view: &TensorView, data: &[f32]) -> Result<(), ErrorReply> {
        if !matches!(view.dtype, DType::F32 | DType::F16 | DType::Bf16) {
            return Err(not_float(view.dtype));
        }
        if data.len() as u64 != view.numel() {
            return Err(ErrorReply::internal("tensor size does not match its view"));
        }
        if data.is_empty() {
            return Ok(());
        }
        let last = *view.shape.last().unwrap_or(&1) as usize;
        let contiguous = view.rows_contiguous();
        let shape = if view.shape.is_empty() {
            vec![1]
        } else {
            view.shape.clone()
        };
        let mut buf = Vec::new();
        for (r, mut idx) in outer_indices(&shape).enumerate() {
            let row = &data[r * last..(r + 1) * last];
            if contiguous {
                encode(view.dtype, row, &mut buf);
                self.write_bytes(view.byte_offset(&idx), &buf)?;
            } else {
                for (c, &x) in row.iter().enumerate() {
                    *idx.last_mut().expect("rank >= 1") = c as u64;
                    encode(view.dtype, &[x], &mut buf);
                    self.write_bytes(view.byte_offset(&idx), &buf)?;
                }
            }
        }
        Ok(())
    }
}

fn decode(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        DType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        DType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        DType::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        _ => unreachable!("checked by the caller"),
    }
}

fn encode(dtype: DType, row: &[f32], buf: &mut Vec<u8>) {
    buf.clear();
    match dtype {
        DType::F32 => buf.extend(row.iter().flat_map(|x| x.to_le_bytes())),
        DType::F16 => buf.extend(row.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes())),
        DType::Bf16 => buf.extend(row.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes())),
        _ => unreachable!("checked by the caller"),
    }
}

#[cfg(test)]
mod tests {
    use crate::region::HostRegion;
    use crate::tensor::{DType, TensorRef};
    use std::os::fd::OwnedFd;

    fn region(bytes: u64) -> HostRegion {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let fd: OwnedFd = memfd_create("tensor-io-test", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, bytes as i64).unwrap();
        HostRegion::from_fd(fd, bytes, "test".into()).unwrap()
    }

    #[test]
    fn strided_tensors_round_trip_in_every_float_dtype() {
        let r = region(4096);
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            // [2, 3, 2] with its middle dimension transposed away from
            // row-major, and a gap between rows.
            let t = TensorRef {
                region_id: 1,
                offset: 64,
                dtype,
                shape: vec![2, 3, 2],
                strides: Some(vec![16, 4, 1]),
            };
            let v = t.resolve(r.size()).unwrap();
            let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
            r.write_f32(&v, &data).unwrap();
            assert_eq!(r.read_f32(&v).unwrap(), data, "{dtype:?}");
            // A column view (last stride not 1) reads element by element.
            let col = TensorRef {
                strides: Some(vec![16, 1, 4]),
                shape: vec![2, 2, 3],
                ..t
            }
            .resolve(r.size())
            .unwrap();
            let back = r.read_f32(&col).unwrap();
            assert_eq!(back[..3], [data[0], data[2], data[4]]);
        }
    }

    #[test]
    fn integer_dtypes_are_refused() {
        let r = region(64);
        let t = TensorRef {
            region_id: 1,
            offset: 0,
            dtype: DType::I32,
            shape: vec![2],
            strides: None,
        };
        let v = t.resolve(64).unwrap();
        assert_eq!(
            r.read_f32(&v).unwrap_err().code,
            crate::ErrorCode::DtypeMismatch
        );
    }
}
