//! The post-RoPE queries and keys of a forward pass, as the attention op
//! sees them: what `tacflowd capture-qk` records so that Tactic is measured
//! on the daemon's own keys (`bench-tactic --keys`), not on another
//! framework's.
//!
//! Recording needs the rows on the host ([`Backend::host_view`]: the CPU
//! backend); a backend without host views records nothing and says so.

use crate::backend::{HostLayerView, RowRange, StepMeta};

/// Per layer and position: q (`heads * head_dim`) and k (`kv_heads *
/// head_dim`), f32 after RoPE.
#[derive(Debug, Clone, Default)]
pub struct QkCapture {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `q[layer][position]`, empty where no row of that position ran.
    pub q: Vec<Vec<Vec<f32>>>,
    pub k: Vec<Vec<Vec<f32>>>,
    /// Attention ops that ran without a host view (nothing recorded).
    pub missed: usize,
}

impl QkCapture {
    pub fn new(layers: usize, heads: usize, kv_heads: usize, head_dim: usize) -> QkCapture {
        QkCapture {
            heads,
            kv_heads,
            head_dim,
            q: vec![vec![]; layers],
            k: vec![vec![]; layers],
            missed: 0,
        }
    }

    /// Records the rows `rows` of layer `layer` at their positions.
    pub fn record(
        &mut self,
        layer: usize,
        view: Option<HostLayerView<'_>>,
        meta: &StepMeta,
        rows: &RowRange,
    ) {
        let Some(v) = view else {
            self.missed += 1;
            return;
        };
        let (qw, kw) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        for r in rows.clone() {
            let pos = meta.positions[r] as usize;
            let row = &v.qkv[r * v.row_len..(r + 1) * v.row_len];
            for (dst, src) in [
                (&mut self.q[layer], &row[..qw]),
                (&mut self.k[layer], &row[qw..qw + kw]),
            ] {
                if dst.len() <= pos {
                    dst.resize(pos + 1, vec![]);
                }
                dst[pos] = src.to_vec();
            }
        }
    }

    /// Positions `0..n` recorded at every layer.
    pub fn complete_to(&self, n: usize) -> bool {
        self.q
            .iter()
            .chain(&self.k)
            .all(|l| l.len() >= n && l[..n].iter().all(|r| !r.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tacflow_kernels::cpu::KvLayer;

    #[test]
    fn rows_land_at_their_positions_per_layer() {
        // 2 heads, 1 KV head of 2: rows [q0 q0 q1 q1 | k k | v v].
        let qkv: Vec<f32> = (0..16).map(|x| x as f32).collect();
        let kv = KvLayer {
            k: &[],
            v: &[],
            kv_heads: 1,
            head_dim: 2,
            block_size: 16,
        };
        let view = HostLayerView {
            qkv: &qkv,
            row_len: 8,
            kv,
        };
        let meta = StepMeta {
            positions: vec![7, 8],
            ..StepMeta::default()
        };
        let mut c = QkCapture::new(2, 2, 1, 2);
        c.record(1, Some(view), &meta, &(0..2));
        assert_eq!(c.q[1][7], vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(c.k[1][8], vec![12.0, 13.0]);
        assert!(c.q[0].is_empty() && c.q[1][3].is_empty());
        assert!(!c.complete_to(9), "layer 0 and positions 0..7 missing");
        c.record(0, None, &meta, &(0..2));
        assert_eq!(c.missed, 1);
    }
}
