//! One `attention_step`: one layer of a batch of attention-only sequences.
//!
//! Everything that can refuse the request is checked before anything
//! changes (sequences, layout, layer, positions, shapes, context, pool),
//! then the inputs are read out of their regions. Only then are blocks
//! taken, the rows' k and v written into slots no reader sees yet (past
//! each sequence's length at this layer), the sparse policies' states grown
//! (with an undo) and the output written; a failure there gives the blocks
//! back and reverts the states, and the lengths advance only at the commit.

use super::pool::exhausted;
use super::{OffSeq, Offload};
use crate::engine::sparse::{LayerQuery, StepDiag, select_layer};
use crate::engine::undo::Undo;
use crate::engine::{BLOCK_SIZE, SeqKey, SessionId};
use std::collections::HashSet;
use std::sync::Arc;
use tacflow_ipc::{AttentionDiagnostics, ErrorCode, ErrorReply, HostRegion, TensorView};
use tacflow_kernels::cpu::{self, AttnSeq};

/// A tensor of the request, checked against its region by the I/O thread
/// (registered, in bounds, a float dtype, rank 3, the batch's row count).
#[derive(Debug, Clone)]
pub struct TensorTarget {
    pub region: Arc<HostRegion>,
    pub view: TensorView,
}

/// An `attention_step` as the executor receives it.
#[derive(Debug)]
pub struct AttentionWork {
    pub session: SessionId,
    pub layer: u32,
    pub seq_ids: Vec<u64>,
    /// New rows per sequence (filled in with ones when the client sent none).
    pub rows: Vec<usize>,
    /// Checked first positions, or empty.
    pub positions: Vec<u64>,
    pub q: TensorTarget,
    pub k: TensorTarget,
    pub v: TensorTarget,
    pub out: TensorTarget,
}

/// What a served request answers: per sequence the layer's length after it,
/// and the diagnostics of decode rows of sequences that asked for them.
pub type Served = (Vec<u64>, Vec<Option<AttentionDiagnostics>>);

fn seq_err(code: ErrorCode, i: usize, msg: String) -> ErrorReply {
    ErrorReply::new(code, format!("sequence {i} of the batch: {msg}")).with("index", i)
}

fn shape_err(what: &str, want: [usize; 3], got: &[u64]) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::ShapeMismatch,
        format!("{what}: expected shape {want:?}, got {got:?}"),
    )
}

impl Offload {
    /// Checks the request against the sequences; returns their keys.
    fn check(&self, w: &AttentionWork) -> Result<Vec<SeqKey>, ErrorReply> {
        let mut seen = HashSet::new();
        let mut keys = Vec::with_capacity(w.seq_ids.len());
        let first = w.seq_ids.first().and_then(|&seq| {
            self.seqs.get(&SeqKey {
                session: w.session,
                seq,
            })
        });
        let layer = w.layer as usize;
        for (i, (&seq, &n)) in w.seq_ids.iter().zip(&w.rows).enumerate() {
            let key = SeqKey {
                session: w.session,
                seq,
            };
            let s = self.seqs.get(&key).ok_or_else(|| {
                seq_err(
                    ErrorCode::UnknownSequence,
                    i,
                    format!("no attention-only sequence {seq} in this session"),
                )
                .with("seq_id", seq)
            })?;
            if !seen.insert(seq) {
                return Err(seq_err(
                    ErrorCode::BadRequest,
                    i,
                    format!("sequence {seq} appears twice"),
                ));
            }
            if first.is_some_and(|f| f.layout != s.layout) {
                return Err(seq_err(
                    ErrorCode::BadRequest,
                    i,
                    "the sequences of one request must share one layout".into(),
                ));
            }
            if layer >= s.lens.len() {
                return Err(seq_err(
                    ErrorCode::BadRequest,
                    i,
                    format!(
                        "layer {layer} is out of range: the layout has {}",
                        s.lens.len()
                    ),
                )
                .with("layer", layer)
                .with("num_layers", s.lens.len()));
            }
            let len = s.lens[layer];
            if let Some(&p) = w.positions.get(i)
                && p != len as u64
            {
                return Err(seq_err(
                    ErrorCode::BadRequest,
                    i,
                    format!("its first row is at position {p}, layer {layer} holds {len} rows"),
                )
                .with("expected", len)
                .with("position", p));
            }
            if len + n > self.max_context {
                return Err(seq_err(
                    ErrorCode::ContextTooLong,
                    i,
                    format!("{} rows exceed the limit of {}", len + n, self.max_context),
                )
                .with("max_context", self.max_context));
            }
            keys.push(key);
        }
        if let Some(s) = first {
            check_shapes(w, s)?;
        }
        Ok(keys)
    }

    /// Serves one request; on error nothing has changed.
    pub fn step(&mut self, w: &AttentionWork) -> Result<Served, ErrorReply> {
        let keys = self.check(w)?;
        let Some(first) = keys.first().map(|k| &self.seqs[k]) else {
            return Ok((vec![], vec![]));
        };
        let layout = first.layout;
        let arena = first.arena;
        let layer = w.layer as usize;
        let needs: Vec<usize> = keys
            .iter()
            .zip(&w.rows)
            .map(|(k, &n)| {
                let s = &self.seqs[k];
                (s.lens[layer] + n)
                    .div_ceil(BLOCK_SIZE)
                    .saturating_sub(s.table.len())
            })
            .collect();
        let need: usize = needs.iter().sum();
        if !self.pool.can_take(arena, need) {
            return Err(exhausted(need, arena, &self.pool));
        }
        let qkv = read_inputs(w, &layout)?;
        let mut fresh = self.pool.take(arena, need).expect("checked above");
        let tables: Vec<Vec<u32>> = keys
            .iter()
            .zip(&needs)
            .map(|(k, &n)| {
                let mut t = self.seqs[k].table.clone();
                t.extend(fresh.drain(..n));
                t
            })
            .collect();
        let taken: Vec<u32> = tables
            .iter()
            .zip(&keys)
            .flat_map(|(t, k)| t[self.seqs[k].table.len()..].to_vec())
            .collect();
        let mut undos: Vec<Undo> = keys.iter().map(|_| Undo::default()).collect();
        match self.run(w, &keys, &tables, &qkv, &mut undos) {
            Ok(diags) => Ok(self.commit(w, &keys, tables, diags)),
            Err(e) => {
                for (k, undo) in keys.iter().zip(undos) {
                    self.seqs.get_mut(k).expect("checked").state.revert(undo);
                }
                self.pool.release(arena, &taken);
                Err(e)
            }
        }
    }

    /// Appends, selects, attends and writes the output.
    fn run(
        &mut self,
        w: &AttentionWork,
        keys: &[SeqKey],
        tables: &[Vec<u32>],
        qkv: &Fused,
        undos: &mut [Undo],
    ) -> Result<Vec<Option<AttentionDiagnostics>>, ErrorReply> {
        let layer = w.layer as usize;
        let s0 = &self.seqs[&keys[0]];
        let (arena_key, l) = (s0.arena, s0.layout);
        let (h, hkv, d) = (
            l.num_heads as usize,
            l.num_kv_heads as usize,
            l.head_dim as usize,
        );
        let mut slots = Vec::with_capacity(qkv.rows);
        for ((k, &n), t) in keys.iter().zip(&w.rows).zip(tables) {
            let len = self.seqs[k].lens[layer];
            slots.extend(
                (len..len + n)
                    .map(|p| t[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32),
            );
        }
        let arena = self.pool.arena_mut(arena_key).expect("blocks were taken");
        let kv = &mut arena.kv;
        cpu::kv_append(
            &mut kv.k[layer],
            &mut kv.v[layer],
            (hkv, BLOCK_SIZE, d),
            &qkv.data,
            qkv.row_len,
            h * d,
            &slots,
        );
        let kv = self
            .pool
            .arena(arena_key)
            .expect("blocks were taken")
            .kv
            .layer(layer);
        let mut selections: Vec<Option<Vec<Vec<u32>>>> = vec![None; keys.len()];
        let mut diags: Vec<Option<AttentionDiagnostics>> = vec![None; keys.len()];
        let mut row = 0;
        for (i, (k, &n)) in keys.iter().zip(&w.rows).enumerate() {
            let s: &mut OffSeq = self.seqs.get_mut(k).expect("checked");
            let ctx_len = s.lens[layer] + n;
            if n == 1 && s.state.is_full() {
                diags[i] = s.diagnostics.then(StepDiag::full);
            } else if n == 1 {
                let at = LayerQuery {
                    layer,
                    q: &qkv.data[row * qkv.row_len..row * qkv.row_len + h * d],
                    kv,
                    table: &tables[i],
                    ctx_len,
                    dims: (h, hkv, d),
                };
                let (sel, diag) = select_layer(&mut s.state, &mut undos[i], s.diagnostics, &at);
                let target = s.state.target();
                diags[i] = diag.map(|d| d.summary(s.policy.name(), target));
                selections[i] = Some(sel);
            }
            row += n;
        }
        let mut seqs = Vec::with_capacity(keys.len());
        let mut q_start = 0;
        for (i, (k, &n)) in keys.iter().zip(&w.rows).enumerate() {
            seqs.push(AttnSeq {
                q_start,
                q_len: n,
                ctx_len: self.seqs[k].lens[layer] + n,
                block_table: &tables[i],
                selection: selections[i].as_deref(),
            });
            q_start += n;
        }
        let mut out = vec![0.0f32; qkv.rows * h * d];
        cpu::paged_attention(&qkv.data, qkv.row_len, h, &kv, &seqs, &mut out);
        w.out.region.write_f32(&w.out.view, &out)?;
        Ok(diags)
    }

    fn commit(
        &mut self,
        w: &AttentionWork,
        keys: &[SeqKey],
        tables: Vec<Vec<u32>>,
        diags: Vec<Option<AttentionDiagnostics>>,
    ) -> Served {
        let layer = w.layer as usize;
        let mut lens = Vec::with_capacity(keys.len());
        for ((k, n), t) in keys.iter().zip(&w.rows).zip(tables) {
            let s = self.seqs.get_mut(k).expect("checked");
            s.table = t;
            s.lens[layer] += n;
            lens.push(s.lens[layer] as u64);
        }
        if self.steps_by_layer.len() <= layer {
            self.steps_by_layer.resize(layer + 1, 0);
        }
        self.steps_by_layer[layer] += 1;
        for (k, d) in keys.iter().zip(&diags) {
            let Some(d) = d else { continue };
            let s = &self.seqs[k];
            let heads = f64::from(s.layout.num_heads);
            let t = self.totals.entry(d.policy.clone()).or_default();
            t.queries += 1;
            t.heads += heads;
            t.read += d.tokens_read_fraction * heads;
            t.mass += d.true_mass * heads;
            t.successes += d.success_rate * heads;
        }
        self.publish();
        let any = diags.iter().any(Option::is_some);
        (lens, if any { diags } else { vec![] })
    }
}

/// The batch's rows as fused `[q | k | v]` f32 rows (the layout the CPU
/// kernels read), q scaled so that the kernels' `1/√head_dim` gives the
/// declared scale.
struct Fused {
    data: Vec<f32>,
    rows: usize,
    row_len: usize,
}

fn check_shapes(w: &AttentionWork, s: &OffSeq) -> Result<(), ErrorReply> {
    let rows: usize = w.rows.iter().sum();
    let l = s.layout;
    let (h, hkv, d) = (
        l.num_heads as usize,
        l.num_kv_heads as usize,
        l.head_dim as usize,
    );
    for (what, t, want) in [
        ("q", &w.q, [rows, h, d]),
        ("k", &w.k, [rows, hkv, d]),
        ("v", &w.v, [rows, hkv, d]),
        ("out", &w.out, [rows, h, d]),
    ] {
        if t.view.shape.iter().map(|&x| x as usize).ne(want) {
            return Err(shape_err(what, want, &t.view.shape));
        }
    }
    Ok(())
}

fn read_inputs(w: &AttentionWork, l: &tacflow_ipc::AttentionLayout) -> Result<Fused, ErrorReply> {
    let (h, hkv, d) = (
        l.num_heads as usize,
        l.num_kv_heads as usize,
        l.head_dim as usize,
    );
    let rows: usize = w.rows.iter().sum();
    let q = w.q.region.read_f32(&w.q.view)?;
    let k = w.k.region.read_f32(&w.k.view)?;
    let v = w.v.region.read_f32(&w.v.view)?;
    let factor = l.scale * (d as f32).sqrt();
    let row_len = (h + 2 * hkv) * d;
    let mut data = vec![0.0f32; rows * row_len];
    for r in 0..rows {
        let dst = &mut data[r * row_len..(r + 1) * row_len];
        let (dq, rest) = dst.split_at_mut(h * d);
        let (dk, dv) = rest.split_at_mut(hkv * d);
        for (o, &x) in dq.iter_mut().zip(&q[r * h * d..(r + 1) * h * d]) {
            *o = x * factor;
        }
        dk.copy_from_slice(&k[r * hkv * d..(r + 1) * hkv * d]);
        dv.copy_from_slice(&v[r * hkv * d..(r + 1) * hkv * d]);
    }
    Ok(Fused {
        data,
        rows,
        row_len,
    })
}
