//! A step's host description as the CUDA kernels want it: per-row causal
//! key counts and block-table offsets.

use super::check;
use crate::backend::StepMeta;
use crate::error::Result;
use tacflow_kernels::cuda::StepArrays;

/// Per-row attention metadata from the host description of a step.
pub(super) fn step_arrays(meta: &StepMeta) -> Result<StepArrays> {
    let rows = meta.tokens.len();
    let mut a = StepArrays {
        tokens: meta.tokens.clone(),
        positions: meta.positions.clone(),
        slots: meta.slots.clone(),
        kv_len: vec![0; rows],
        table_off: vec![0; rows],
        tables: Vec::new(),
        logit_rows: meta.logit_rows.clone(),
    };
    let mut covered = 0;
    for s in &meta.seqs {
        check(
            s.q_len <= s.ctx_len
                && s.q_start + s.q_len <= rows
                && s.ctx_len <= 16 * s.block_table.len(),
            || {
                format!(
                    "sequence rows {}+{} of {rows}, {} cached in {} blocks",
                    s.q_start,
                    s.q_len,
                    s.ctx_len,
                    s.block_table.len()
                )
            },
        )?;
        let off = a.tables.len() as u32;
        a.tables.extend_from_slice(&s.block_table);
        for i in 0..s.q_len {
            a.kv_len[s.q_start + i] = (s.ctx_len - s.q_len + i + 1) as u32;
            a.table_off[s.q_start + i] = off;
        }
        covered += s.q_len;
    }
    check(covered == rows && a.kv_len.iter().all(|&l| l > 0), || {
        format!("the sequences cover {covered} of {rows} rows, each exactly once")
    })?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SeqMeta;

    #[test]
    fn step_arrays_give_each_row_its_causal_key_count_and_table() {
        let meta = StepMeta {
            tokens: vec![5, 6, 7, 8],
            positions: vec![17, 18, 19, 3],
            slots: vec![1, 2, 3, 4],
            seqs: vec![
                SeqMeta {
                    q_start: 0,
                    q_len: 3,
                    ctx_len: 20,
                    block_table: vec![9, 4],
                },
                SeqMeta {
                    q_start: 3,
                    q_len: 1,
                    ctx_len: 4,
                    block_table: vec![7],
                },
            ],
            logit_rows: vec![2, 3],
        };
        let a = step_arrays(&meta).unwrap();
        assert_eq!(a.kv_len, vec![18, 19, 20, 4]);
        assert_eq!(a.table_off, vec![0, 0, 0, 2]);
        assert_eq!(a.tables, vec![9, 4, 7]);
        let mut bad = meta.clone();
        bad.seqs[1].ctx_len = 17; // more keys than one block holds
        assert!(step_arrays(&bad).is_err());
        let mut gap = meta;
        gap.seqs.pop(); // row 3 belongs to no sequence
        assert!(step_arrays(&gap).is_err());
    }
}
