//! The KV pool of attention-only sequences: one arena per cache shape
//! (layers, KV heads, head size), each a paged f32 cache that grows with
//! its use, all of them within one byte budget. An arena whose blocks are
//! all free is dropped, so that its bytes go back to the budget.

use crate::backend::KvLayout;
use crate::backend::cpu::CpuKv;
use crate::engine::BLOCK_SIZE;
use crate::engine::kv_cache::BlockAllocator;
use std::collections::HashMap;
use tacflow_ipc::{AttentionLayout, ErrorCode, ErrorReply};

/// The cache shape an arena serves: `(layers, kv_heads, head_dim)`.
pub type ArenaKey = (usize, usize, usize);

pub fn arena_key(l: &AttentionLayout) -> ArenaKey {
    (
        l.num_layers as usize,
        l.num_kv_heads as usize,
        l.head_dim as usize,
    )
}

/// Bytes of one block of `key`: K and V of every layer, f32.
pub fn block_bytes(key: ArenaKey) -> u64 {
    let (layers, kv_heads, d) = key;
    (2 * layers * kv_heads * BLOCK_SIZE * d * 4) as u64
}

#[derive(Debug)]
pub struct Arena {
    pub kv: CpuKv,
    pub alloc: BlockAllocator,
}

#[derive(Debug)]
pub struct Pool {
    budget: u64,
    /// Bytes the arenas have allocated (held blocks and free ones).
    reserved: u64,
    arenas: HashMap<ArenaKey, Arena>,
}

impl Pool {
    pub fn new(budget: u64) -> Pool {
        Pool {
            budget,
            reserved: 0,
            arenas: HashMap::new(),
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn arena(&self, key: ArenaKey) -> Option<&Arena> {
        self.arenas.get(&key)
    }

    pub fn arena_mut(&mut self, key: ArenaKey) -> Option<&mut Arena> {
        self.arenas.get_mut(&key)
    }

    /// Blocks held over every arena, and their bytes.
    pub fn used(&self) -> (u64, u64) {
        self.arenas.iter().fold((0, 0), |(n, b), (k, a)| {
            let held = (a.alloc.total() - a.alloc.free_count()) as u64;
            (n + held, b + held * block_bytes(*k))
        })
    }

    /// Whether `n` more blocks of `key` can be had, growing its arena within
    /// the budget if needed.
    pub fn can_take(&self, key: ArenaKey, n: usize) -> bool {
        let free = self.arenas.get(&key).map_or(0, |a| a.alloc.free_count());
        let missing = n.saturating_sub(free) as u64;
        self.reserved + missing * block_bytes(key) <= self.budget
    }

    /// Takes `n` blocks of `key`, growing (or creating) its arena; `None`
    /// when the budget cannot hold them (nothing is taken then).
    pub fn take(&mut self, key: ArenaKey, n: usize) -> Option<Vec<u32>> {
        if !self.can_take(key, n) {
            return None;
        }
        let bb = block_bytes(key);
        let room = ((self.budget - self.reserved) / bb) as usize;
        let arena = self.arenas.entry(key).or_insert_with(|| new_arena(key));
        let free = arena.alloc.free_count();
        if free < n {
            // Doubling keeps the copies of a growing cache amortised; the
            // budget caps it.
            let want = (n - free).max(arena.alloc.total()).max(16);
            let extra = want.min(room).max(n - free);
            grow(arena, extra);
            self.reserved += extra as u64 * bb;
        }
        arena.alloc.alloc(n)
    }

    /// Gives blocks back; an arena left with none held is dropped.
    pub fn release(&mut self, key: ArenaKey, blocks: &[u32]) {
        let Some(arena) = self.arenas.get_mut(&key) else {
            return;
        };
        arena.alloc.release_all(blocks);
        if arena.alloc.all_free() {
            let total = arena.alloc.total() as u64;
            self.arenas.remove(&key);
            self.reserved -= total * block_bytes(key);
        }
    }
}

fn new_arena(key: ArenaKey) -> Arena {
    let (num_layers, num_kv_heads, head_dim) = key;
    Arena {
        kv: CpuKv {
            layout: KvLayout {
                num_layers,
                num_blocks: 0,
                block_size: BLOCK_SIZE,
                num_kv_heads,
                head_dim,
            },
            k: vec![Vec::new(); num_layers],
            v: vec![Vec::new(); num_layers],
        },
        alloc: BlockAllocator::new(0),
    }
}

/// Appends `n` blocks to every layer (blocks are the outer dimension, so the
/// existing ones keep their offsets).
fn grow(a: &mut Arena, n: usize) {
    a.kv.layout.num_blocks += n;
    let len = a.kv.layout.num_blocks * a.kv.layout.block_elems();
    for layer in a.kv.k.iter_mut().chain(a.kv.v.iter_mut()) {
        layer.resize(len, 0.0);
    }
    a.alloc.grow(n);
}

/// The refusal of a request whose blocks the pool cannot hold.
pub fn exhausted(needed: usize, key: ArenaKey, pool: &Pool) -> ErrorReply {
    let (_, used) = pool.used();
    ErrorReply::new(
        ErrorCode::OutOfKvBlocks,
        format!(
            "the attention pool cannot hold {needed} more blocks of {} bytes: {used} of its \
             {} bytes are held (daemon option attention_pool_mb)",
            block_bytes(key),
            pool.budget()
        ),
    )
    .with("needed", needed)
    .with("free_bytes", pool.budget().saturating_sub(used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arenas_grow_within_the_budget_and_go_when_empty() {
        let key = (2, 1, 4);
        let bb = block_bytes(key);
        let mut p = Pool::new(40 * bb);
        let a = p.take(key, 3).unwrap();
        assert_eq!(p.used(), (3, 3 * bb));
        let b = p.take(key, 30).unwrap();
        assert!(p.take(key, 8).is_none(), "33 + 8 blocks exceed 40");
        assert!(p.can_take(key, 7));
        p.release(key, &a);
        assert_eq!(p.used().0, 30);
        p.release(key, &b);
        assert_eq!(p.used(), (0, 0));
        assert!(p.arena(key).is_none(), "an empty arena is dropped");
        assert!(p.take(key, 40).is_some(), "its bytes came back");
    }

    #[test]
    fn grown_arenas_keep_their_blocks_in_place() {
        let key = (1, 2, 2);
        let mut p = Pool::new(1 << 20);
        let first = p.take(key, 1).unwrap()[0] as usize;
        let n = p.arena(key).unwrap().kv.layout.block_elems();
        p.arena_mut(key).unwrap().kv.k[0][first * n] = 7.0;
        let _more = p.take(key, 100).unwrap();
        assert_eq!(p.arena(key).unwrap().kv.k[0][first * n], 7.0);
    }
}
