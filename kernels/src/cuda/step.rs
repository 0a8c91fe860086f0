//! A step's metadata on the device: every per-token and per-sequence array
//! the kernels read, packed into one u32 buffer so a step costs one upload.

use super::device::Gpu;
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;

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
        })
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
