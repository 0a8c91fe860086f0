//! The CUDA backend's tensors: activations, weight matrices, vectors, and
//! the rows of an activation that an op over a row range works on (views
//! in place: `tacflow_kernels::cuda::view`).

use super::check;
use crate::backend::RowRange;
use crate::error::{Error, Result};
use half::bf16;
use tacflow_kernels::cuda::{
    CudaSlice, CudaView, CudaViewMut, Pooled, Rows, row_view, row_view_mut,
};

/// An activation `[rows, cols]`; see the module doc of `backend::cuda` for
/// its dtype.
pub struct Act {
    pub rows: usize,
    pub cols: usize,
    pub(super) buf: ActBuf,
}

pub(super) enum ActBuf {
    /// Not written yet: allocated by the first op that writes it (with one
    /// lane; with several, `CudaBackend::act` allocates it up front).
    Empty,
    /// At least `rows * cols` elements, from the backend's pool.
    F32(Pooled),
    Bf16(CudaSlice<bf16>),
}

/// Rows of an activation as a GEMM reads them.
pub(super) enum RowsOf<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, bf16>),
}

impl Act {
    pub(super) fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.buf {
            ActBuf::F32(s) => Ok(s),
            ActBuf::Bf16(_) => Err(Error::Backend(format!(
                "{what}: expected f32 rows, got bf16"
            ))),
            ActBuf::Empty => Err(Error::Backend(format!(
                "{what}: reading an unwritten activation"
            ))),
        }
    }

    pub(super) fn f32_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f32>> {
        match &mut self.buf {
            ActBuf::F32(s) => Ok(s),
            _ => Err(Error::Backend(format!("{what}: expected written f32 rows"))),
        }
    }

    pub(super) fn shape(&self) -> Rows {
        Rows {
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// `rows.len()` rows of this activation's width.
    pub(super) fn shape_of(&self, rows: &RowRange) -> Rows {
        Rows {
            rows: rows.len(),
            cols: self.cols,
        }
    }

    /// Refuses a range that is not rows of this activation.
    pub(super) fn in_range(&self, what: &str, rows: &RowRange) -> Result<()> {
        check(rows.start <= rows.end && rows.end <= self.rows, || {
            format!("{what}: rows {rows:?} of {}", self.rows)
        })
    }

    /// Rows `rows` of the written f32 buffer, to read.
    pub(super) fn rows_f32(&self, what: &str, rows: &RowRange) -> Result<CudaView<'_, f32>> {
        self.in_range(what, rows)?;
        Ok(row_view(self.f32(what)?, rows, self.cols)?)
    }

    /// Rows `rows` of the written f32 buffer, to update in place.
    pub(super) fn rows_f32_mut(
        &mut self,
        what: &str,
        rows: &RowRange,
    ) -> Result<CudaViewMut<'_, f32>> {
        self.in_range(what, rows)?;
        let cols = self.cols;
        Ok(row_view_mut(self.f32_mut(what)?, rows, cols)?)
    }

    /// Rows `rows` in whichever dtype the activation holds (a GEMM's input).
    pub(super) fn rows_any(&self, what: &str, rows: &RowRange) -> Result<RowsOf<'_>> {
        self.in_range(what, rows)?;
        Ok(match &self.buf {
            ActBuf::F32(s) => RowsOf::F32(row_view(s, rows, self.cols)?),
            ActBuf::Bf16(s) => RowsOf::Bf16(row_view(s, rows, self.cols)?),
            ActBuf::Empty => {
                return Err(Error::Backend(format!(
                    "{what}: reading an unwritten activation"
                )));
            }
        })
    }
}

/// A weight matrix in bf16, PyTorch `nn.Linear` layout.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub(super) data: CudaSlice<bf16>,
}

impl Matrix {
    /// The values, `rows` x `cols` row-major (a benchmark's GEMM operand).
    pub fn data(&self) -> &CudaSlice<bf16> {
        &self.data
    }
}

/// A vector in f32 (norm weights hold bf16-rounded values).
pub struct Vector {
    pub len: usize,
    pub(super) data: CudaSlice<f32>,
}
