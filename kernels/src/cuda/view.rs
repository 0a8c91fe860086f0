//! Rows of a row-major buffer in place: an op over a range of its
//! activation's rows (a nano-batch) runs on a view that starts at the
//! range's first row and holds its rows, so the kernels see a smaller
//! matrix and nothing is copied. The element range is checked against the
//! buffer here; the launch wrappers then check the view's length as they
//! check a whole buffer's.

use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use std::ops::Range;

/// Elements of rows `rows` of a row-major matrix `cols` wide, in a buffer of
/// `len` elements: `rows.start * cols .. rows.end * cols`, or an error when
/// the range is reversed or runs past the buffer.
pub fn row_span(rows: &Range<usize>, cols: usize, len: usize) -> Result<Range<usize>> {
    let bad = || {
        Error::Shape(format!(
            "rows {rows:?} of {cols} columns in a buffer of {len} elements"
        ))
    };
    if rows.start > rows.end {
        return Err(bad());
    }
    let start = rows.start.checked_mul(cols).ok_or_else(bad)?;
    let end = rows.end.checked_mul(cols).ok_or_else(bad)?;
    if end > len {
        return Err(bad());
    }
    Ok(start..end)
}

/// Rows `rows` of `s` (`cols` wide), read-only.
pub fn row_view<'a, T>(
    s: &'a CudaSlice<T>,
    rows: &Range<usize>,
    cols: usize,
) -> Result<CudaView<'a, T>> {
    let span = row_span(rows, cols, s.len())?;
    Ok(s.slice(span))
}

/// Rows `rows` of `s` (`cols` wide), to write.
pub fn row_view_mut<'a, T>(
    s: &'a mut CudaSlice<T>,
    rows: &Range<usize>,
    cols: usize,
) -> Result<CudaViewMut<'a, T>> {
    let span = row_span(rows, cols, s.len())?;
    Ok(s.slice_mut(span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_range_is_its_elements() {
        assert_eq!(row_span(&(0..4), 3, 12).unwrap(), 0..12, "the whole");
        assert_eq!(row_span(&(1..3), 3, 12).unwrap(), 3..9, "the middle");
        assert_eq!(row_span(&(3..4), 3, 12).unwrap(), 9..12, "the last row");
        assert_eq!(row_span(&(2..2), 3, 12).unwrap(), 6..6, "no rows");
        // A pooled buffer may be longer than the activation.
        assert_eq!(row_span(&(1..2), 5, 64).unwrap(), 5..10);
    }

    #[test]
    fn a_row_range_past_the_buffer_is_refused() {
        assert!(row_span(&(3..5), 3, 12).is_err(), "past the end");
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 3..1;
        assert!(row_span(&reversed, 3, 12).is_err(), "reversed");
        assert!(row_span(&(0..usize::MAX), 2, 12).is_err(), "overflow");
    }
}
