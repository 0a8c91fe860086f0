//! The paged KV cache's bookkeeping: which blocks are free, and how many
//! sequences share each (copy-on-write forks). The block contents live in
//! the backend; this module only hands out block ids.

/// Reference-counted block allocator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockAllocator {
    refcount: Vec<u32>,
    /// Free block ids; popped from the end, so recently freed blocks are
    /// reused first (warm in caches).
    free: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> BlockAllocator {
        BlockAllocator {
            refcount: vec![0; num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
        }
    }

    pub fn total(&self) -> usize {
        self.refcount.len()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn refcount(&self, block: u32) -> u32 {
        self.refcount[block as usize]
    }

    /// Adds `n` free blocks after the last one (a pool that grows with its
    /// use: attention offload's arenas).
    pub fn grow(&mut self, n: usize) {
        let old = self.refcount.len();
        self.refcount.resize(old + n, 0);
        // Popped from the end: the lowest new id goes first.
        self.free.extend((old as u32..(old + n) as u32).rev());
    }

    /// Whether no block is held.
    pub fn all_free(&self) -> bool {
        self.free.len() == self.refcount.len()
    }

    /// Takes `n` blocks, or none if fewer than `n` are free.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let out = self.free.split_off(self.free.len() - n);
        for &b in &out {
            debug_assert_eq!(self.refcount[b as usize], 0);
            self.refcount[b as usize] = 1;
        }
        Some(out)
    }

    /// One more owner of `block` (a fork).
    pub fn retain(&mut self, block: u32) {
        let rc = &mut self.refcount[block as usize];
        assert!(*rc > 0, "retain of free block {block}");
        *rc += 1;
    }

    /// One owner fewer; the block is free when none is left.
    pub fn release(&mut self, block: u32) {
        let rc = &mut self.refcount[block as usize];
        assert!(*rc > 0, "release of free block {block}");
        *rc -= 1;
        if *rc == 0 {
            self.free.push(block);
        }
    }

    pub fn release_all(&mut self, blocks: &[u32]) {
        for &b in blocks {
            self.release(b);
        }
    }
}

/// Blocks needed to hold `tokens` tokens.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// What appending to one sequence needs: the new block table, the blocks it
/// allocated, and the copy-on-write copies to make before writing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AppendPlan {
    pub table: Vec<u32>,
    /// Blocks taken from the allocator for this append (released on failure).
    pub fresh: Vec<u32>,
    /// `(shared source, private copy)`: the source loses this owner on commit.
    pub cow: Option<(u32, u32)>,
}

/// Blocks an append of `n` tokens to a sequence of `len` tokens over `table`
/// will take from the allocator.
pub fn append_cost(
    alloc: &BlockAllocator,
    table: &[u32],
    len: usize,
    n: usize,
    bs: usize,
) -> usize {
    let grow = blocks_for(len + n, bs).saturating_sub(table.len());
    let cow = usize::from(!len.is_multiple_of(bs) && alloc.refcount(table[len / bs]) > 1);
    grow + cow
}

/// Plans an append, taking blocks from `alloc`. The caller has checked the
/// cost fits; it returns `None` only if it does not.
pub fn plan_append(
    alloc: &mut BlockAllocator,
    table: &[u32],
    len: usize,
    n: usize,
    bs: usize,
) -> Option<AppendPlan> {
    let cost = append_cost(alloc, table, len, n, bs);
    let mut fresh = alloc.alloc(cost)?;
    let mut new_table = table[..blocks_for(len, bs)].to_vec();
    let mut cow = None;
    if !len.is_multiple_of(bs) && alloc.refcount(table[len / bs]) > 1 {
        // The partly filled last block is shared: write into a private copy.
        let copy = fresh.pop().expect("cost counted the copy");
        let last = new_table.len() - 1;
        cow = Some((new_table[last], copy));
        new_table[last] = copy;
    }
    new_table.extend_from_slice(&fresh);
    if let Some((_, copy)) = cow {
        fresh.push(copy);
    }
    Some(AppendPlan {
        table: new_table,
        fresh,
        cow,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_release_round_trip() {
        let mut a = BlockAllocator::new(4);
        let b = a.alloc(3).unwrap();
        assert_eq!(a.free_count(), 1);
        assert!(a.alloc(2).is_none());
        assert_eq!(a.free_count(), 1, "a failed alloc takes nothing");
        a.retain(b[0]);
        a.release(b[0]);
        assert_eq!(a.free_count(), 1);
        a.release_all(&b);
        assert_eq!(a.free_count(), 4);
    }

    #[test]
    fn append_across_a_block_boundary() {
        let mut a = BlockAllocator::new(8);
        let p = plan_append(&mut a, &[], 0, 17, 16).unwrap();
        assert_eq!(p.table.len(), 2);
        assert_eq!(p.cow, None);
        let q = plan_append(&mut a, &p.table, 17, 15, 16).unwrap();
        assert_eq!(q.table, p.table, "fills the second block exactly");
        assert!(q.fresh.is_empty());
        let r = plan_append(&mut a, &q.table, 32, 1, 16).unwrap();
        assert_eq!(r.table.len(), 3);
    }

    #[test]
    fn shared_partial_block_is_copied_shared_full_blocks_are_not() {
        let mut a = BlockAllocator::new(8);
        let parent = plan_append(&mut a, &[], 0, 20, 16).unwrap().table;
        for &b in &parent {
            a.retain(b); // fork
        }
        assert_eq!(append_cost(&a, &parent, 20, 1, 16), 1);
        let child = plan_append(&mut a, &parent, 20, 1, 16).unwrap();
        assert_eq!(child.table[0], parent[0], "full block stays shared");
        assert_ne!(child.table[1], parent[1]);
        assert_eq!(child.cow, Some((parent[1], child.table[1])));
        // At a block boundary nothing is copied.
        let mut a = BlockAllocator::new(8);
        let t = plan_append(&mut a, &[], 0, 16, 16).unwrap().table;
        a.retain(t[0]);
        assert_eq!(append_cost(&a, &t, 16, 1, 16), 1);
        assert_eq!(plan_append(&mut a, &t, 16, 1, 16).unwrap().cow, None);
    }

    #[test]
    fn append_after_truncate_reuses_the_table_prefix() {
        let mut a = BlockAllocator::new(8);
        let t = plan_append(&mut a, &[], 0, 40, 16).unwrap().table;
        // Truncated to 10 tokens, the caller keeps 1 block.
        let p = plan_append(&mut a, &t[..1], 10, 3, 16).unwrap();
        assert_eq!(p.table, vec![t[0]]);
    }
}
