//! Where the selection reads key rows from: the paged cache in the engine,
//! a dense `[n, d]` array in tests and the offline evaluator.

use crate::cpu::KvLayer;

/// Read access to one KV head's key rows by slot.
pub trait KeyRows {
    fn dim(&self) -> usize;
    fn key(&self, slot: usize) -> &[f32];
}

/// One KV head of one sequence in the paged cache (`[blocks, kv_heads,
/// block_size, head_dim]`, the layout of [`KvLayer`]).
#[derive(Debug, Clone, Copy)]
pub struct PagedKeys<'a> {
    pub kv: KvLayer<'a>,
    pub block_table: &'a [u32],
    pub head: usize,
}

impl KeyRows for PagedKeys<'_> {
    #[inline]
    fn dim(&self) -> usize {
        self.kv.head_dim
    }
    #[inline]
    fn key(&self, slot: usize) -> &[f32] {
        let (bs, d) = (self.kv.block_size, self.kv.head_dim);
        let b = self.block_table[slot / bs] as usize;
        let r = (b * self.kv.kv_heads + self.head) * bs * d + (slot % bs) * d;
        &self.kv.k[r..r + d]
    }
}

/// Keys stored densely, row `slot` at `slot * d`.
#[derive(Debug, Clone, Copy)]
pub struct DenseKeys<'a> {
    pub k: &'a [f32],
    pub d: usize,
}

impl KeyRows for DenseKeys<'_> {
    #[inline]
    fn dim(&self) -> usize {
        self.d
    }
    #[inline]
    fn key(&self, slot: usize) -> &[f32] {
        &self.k[slot * self.d..(slot + 1) * self.d]
    }
}

/// Dot product with eight independent accumulators (vectorises, and the
/// summation order is fixed: a GPU version can reproduce it).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    for (j, (x, y)) in ar.iter().zip(br).enumerate() {
        acc[j] += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}
