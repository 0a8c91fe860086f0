//! A step's metadata on the device: every per-token and per-sequence array
//! the kernels read, packed into one u32 buffer so a step costs one upload;
//! and [`StepRows`], a range of its token rows (an op over a nano-batch
//! reads the per-row arrays from the range's first row on).

use super::device::Gpu;
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;
use std::ops::Range;

/// The host side of a step, as the kernels want it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepArrays {
    /// Token id of each row.
    pub tokens: Vec<u32>,
    /// RoPE position of each row.
    pub positions: Vec<u32>,
    /// KV slot (`block * 16 + offset`) each row's K and V go to.
    pub slots: Vec<u32>,
    /// Keys row r attends to: slots `0..kv_len[r]` of its sequence.
    pub kv_len: Vec<u32>,
    /// Where row r's block table starts in `tables`.
    pub table_off: Vec<u32>,
    /// Every sequence's block table, concatenated.
    pub tables: Vec<u32>,
    /// Rows whose logits are wanted.
    pub logit_rows: Vec<u32>,
}

/// Indices into the packed buffer.
const TOKENS: usize = 0;
const POSITIONS: usize = 1;
const SLOTS: usize = 2;
const KV_LEN: usize = 3;
const TABLE_OFF: usize = 4;
const TABLES: usize = 5;
const LOGIT_ROWS: usize = 6;

/// A step uploaded to the device, with the maxima that the launch wrappers
/// check against buffer sizes (the kernels themselves do not bounds-check).
#[derive(Debug)]
pub struct DeviceStep {
    pub(crate) buf: CudaSlice<u32>,
    /// Where each array starts in `buf` (fixed capacities for a graph's
    /// persistent step: `graph::GraphStep`).
    pub(crate) offsets: [usize; 7],
    pub rows: usize,
    pub logit_rows: usize,
    /// Largest of each array (0 when empty).
    pub max_token: u32,
    pub max_slot: u32,
    pub max_block: u32,
    pub max_kv_len: u32,
    pub max_logit_row: u32,
    /// `kv_len` on the host: an attention over a range of rows plans for
    /// the longest context among them.
    pub(crate) kv_len: Vec<u32>,
    /// `table_off` on the host: with `kv_len`, where the prefill chunks are
    /// (`prefill::split_rows`).
    pub(crate) table_off: Vec<u32>,
}

fn max_of(v: &[u32]) -> u32 {
    v.iter().copied().max().unwrap_or(0)
}

impl DeviceStep {
    pub fn upload(gpu: &Gpu, a: &StepArrays) -> Result<DeviceStep> {
        let rows = a.tokens.len();
        for (name, len) in [
            ("positions", a.positions.len()),
            ("slots", a.slots.len()),
            ("kv_len", a.kv_len.len()),
            ("table_off", a.table_off.len()),
        ] {
            if len != rows {
                return Err(Error::Shape(format!(
                    "step: {len} {name} for {rows} tokens"
                )));
            }
        }
        for (r, (&len, &off)) in a.kv_len.iter().zip(&a.table_off).enumerate() {
            let blocks = (len as usize).div_ceil(16);
            if len == 0 || off as usize + blocks > a.tables.len() {
                return Err(Error::Shape(format!(
                    "step row {r}: {len} keys need {blocks} blocks from {off}, the tables hold {}",
                    a.tables.len()
                )));
            }
        }
        let parts: [&[u32]; 7] = [
            &a.tokens,
            &a.positions,
            &a.slots,
            &a.kv_len,
            &a.table_off,
            &a.tables,
            &a.logit_rows,
        ];
        let mut packed = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
        let mut offsets = [0usize; 7];
        for (i, p) in parts.iter().enumerate() {
            offsets[i] = packed.len();
            packed.extend_from_slice(p);
        }
        Ok(DeviceStep {
            buf: gpu.upload(&packed)?,
            offsets,
            rows,
            logit_rows: a.logit_rows.len(),
            max_token: max_of(&a.tokens),
            max_slot: max_of(&a.slots),
            max_block: max_of(&a.tables),
            max_kv_len: max_of(&a.kv_len),
            max_logit_row: max_of(&a.logit_rows),
            kv_len: a.kv_len.clone(),
            table_off: a.table_off.clone(),
        })
    }

    /// Token rows `rows` of the step (checked against its rows).
    pub fn rows(&self, rows: Range<usize>) -> Result<StepRows<'_>> {
        check_rows(&rows, self.rows)?;
        Ok(StepRows { step: self, rows })
    }

    fn at(&self, gpu: &Gpu, i: usize) -> u64 {
        gpu.ptr(&self.buf) + 4 * self.offsets[i] as u64
    }

    pub(crate) fn tokens(&self, gpu: &Gpu) -> u64 {
        self.at(gpu, TOKENS)
    }
    pub(crate) fn positions(&self, gpu: &Gpu) -> u64 {
        self.at(gpu, POSITIONS)
    }
    pub(crate) fn slots(&self, gpu: &Gpu) -> u64 {
        self.at(gpu, SLOTS)
    }
    pub(crate) fn kv_len(&self, gpu: &Gpu) -> u64 {
        self.at(gpu, KV_LEN)
    }
    pub(crate) fn table_off(&self, gpu: &Gpu) -> u64 {
        self.at(gpu, TABLE_OFF)
    }
    pub(crate) fn tables(&self, gpu: &Gpu) -> u64 {
        self.at(gpu, TABLES)
    }
    pub(crate) fn logit_rows_ptr(&self, gpu: &Gpu) -> u64 {
        self.at(gpu, LOGIT_ROWS)
    }
}

/// Token rows `start..end` of a step: the per-row arrays (tokens,
/// positions, slots, kv_len, table_off) seen from row `start` on, so that a
/// kernel launched for `len()` rows reads the range's entries; the block
/// tables, indexed by `table_off`, are the step's. The whole step is
/// `StepRows::from(&step)`, whose addresses are the step's own.
#[derive(Debug, Clone)]
pub struct StepRows<'a> {
    pub step: &'a DeviceStep,
    rows: Range<usize>,
}

impl<'a> From<&'a DeviceStep> for StepRows<'a> {
    fn from(step: &'a DeviceStep) -> StepRows<'a> {
        StepRows {
            step,
            rows: 0..step.rows,
        }
    }
}

impl StepRows<'_> {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn range(&self) -> Range<usize> {
        self.rows.clone()
    }

    /// Bytes from an array's start to the range's first entry.
    fn skip(&self) -> u64 {
        entry_offset(self.rows.start)
    }

    /// The longest context among the rows (the step's for all of them).
    pub fn max_kv_len(&self) -> u32 {
        range_max(&self.step.kv_len, &self.rows, self.step.max_kv_len)
    }

    /// The rows' key counts, on the host.
    pub fn host_kv_len(&self) -> &[u32] {
        &self.step.kv_len[self.rows.clone()]
    }

    /// The rows' block-table offsets, on the host.
    pub fn host_table_off(&self) -> &[u32] {
        &self.step.table_off[self.rows.clone()]
    }

    pub(crate) fn tokens(&self, gpu: &Gpu) -> u64 {
        self.step.tokens(gpu) + self.skip()
    }
    pub(crate) fn positions(&self, gpu: &Gpu) -> u64 {
        self.step.positions(gpu) + self.skip()
    }
    pub(crate) fn slots(&self, gpu: &Gpu) -> u64 {
        self.step.slots(gpu) + self.skip()
    }
    pub(crate) fn kv_len(&self, gpu: &Gpu) -> u64 {
        self.step.kv_len(gpu) + self.skip()
    }
    pub(crate) fn table_off(&self, gpu: &Gpu) -> u64 {
        self.step.table_off(gpu) + self.skip()
    }
    pub(crate) fn tables(&self, gpu: &Gpu) -> u64 {
        self.step.tables(gpu)
    }
}

/// `rows` is a range of a step's `n` rows.
fn check_rows(rows: &Range<usize>, n: usize) -> Result<()> {
    if rows.start > rows.end || rows.end > n {
        return Err(Error::Shape(format!("rows {rows:?} of a step of {n}")));
    }
    Ok(())
}

/// Bytes from the start of a u32 array to entry `row`.
fn entry_offset(row: usize) -> u64 {
    4 * row as u64
}

/// The largest of `v[rows]`: `whole` (the maximum of all of `v`, kept at
/// upload) when `rows` is all of `v`, so the whole step plans as before.
fn range_max(v: &[u32], rows: &Range<usize>, whole: u32) -> u32 {
    if *rows == (0..v.len()) {
        return whole;
    }
    max_of(&v[rows.clone()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_range_reads_its_own_entries() {
        assert_eq!(entry_offset(0), 0, "the whole step: the step's addresses");
        assert_eq!(entry_offset(3), 12);
        let kv_len = [300, 301, 302, 40, 41, 7];
        assert_eq!(range_max(&kv_len, &(0..6), 302), 302);
        assert_eq!(range_max(&kv_len, &(3..5), 302), 41, "the range's longest");
        assert_eq!(range_max(&kv_len, &(2..4), 302), 302);
        assert_eq!(range_max(&kv_len, &(4..4), 302), 0, "no rows");
    }

    #[test]
    fn a_row_range_stays_inside_the_step() {
        assert!(check_rows(&(0..6), 6).is_ok());
        assert!(check_rows(&(2..2), 6).is_ok());
        assert!(check_rows(&(5..7), 6).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 4..2;
        assert!(check_rows(&reversed, 6).is_err());
    }
}
