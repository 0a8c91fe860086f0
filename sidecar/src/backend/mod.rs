//! The backend interface: the handful of ops the decoder is written against.
//!
//! The forward pass (`model::forward`) is written once over [`Backend`]; the
//! CPU backend is the f32 reference, the CUDA backend runs the same ops in
//! bf16 on the GPU. A backend owns its memory: activations, weights and the
//! KV cache are its associated types, opaque to the model code.
//!
//! A step is described on the host by a [`StepMeta`] and handed to the
//! backend once ([`Backend::begin_step`]), so a GPU backend uploads tokens,
//! positions, slots and block tables in one go and every op reads them on
//! the device.

pub mod cpu;
pub mod cuda;
#[cfg(any(test, feature = "fault-injection"))]
pub mod faults;
#[cfg(any(test, feature = "fault-injection"))]
pub mod recording;
pub mod tactic;

use crate::error::Result;
use crate::model::Workspace;
use half::{bf16, f16};
use tacflow_ipc::{ErrorCode, ErrorReply};
use tacflow_kernels::cpu::{Processing, SampleParams, Sampled};

/// Weights as they come from a loader, before the backend converts them.
#[derive(Debug, Clone, Copy)]
pub enum HostData<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    /// Seeded random values (`tacflow_kernels::rng::random_weight` of
    /// `(seed, stream, index)`), generated where the weights live so that a
    /// large random model needs no host copy.
    Random {
        seed: u64,
        stream: u64,
        mean: f32,
        std: f32,
    },
}

impl HostData<'_> {
    /// The `n` values as f32, generating random ones (in parallel: a large
    /// random model is hundreds of millions of values).
    pub fn to_f32(&self, n: usize) -> Vec<f32> {
        use rayon::prelude::*;
        match *self {
            HostData::F32(d) => d.to_vec(),
            HostData::Bf16(d) => d.par_iter().map(|x| x.to_f32()).collect(),
            HostData::F16(d) => d.par_iter().map(|x| x.to_f32()).collect(),
            HostData::Random {
                seed,
                stream,
                mean,
                std,
            } => (0..n as u64)
                .into_par_iter()
                .map(|i| tacflow_kernels::rng::random_weight(seed, stream, i, mean, std))
                .collect(),
        }
    }

    /// Element count of host data; `None` for generated data.
    pub fn host_len(&self) -> Option<usize> {
        match self {
            HostData::F32(d) => Some(d.len()),
            HostData::Bf16(d) => Some(d.len()),
            HostData::F16(d) => Some(d.len()),
            HostData::Random { .. } => None,
        }
    }
}

/// Shape of the attention part of a model, as ops need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnDims {
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Width of a fused `[q | k | v]` row.
    pub fn qkv_dim(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }
}

/// Shape of the paged KV cache: per layer, K and V each
/// `[num_blocks, num_kv_heads, block_size, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Elements of one block of one layer's K (or V).
    pub fn block_elems(&self) -> usize {
        self.num_kv_heads * self.block_size * self.head_dim
    }
}

/// One sequence's part of a step (see `tacflow_kernels::cpu::AttnSeq`).
#[derive(Debug, Clone, PartialEq)]
pub struct SeqMeta {
    /// First row of the step's token rows that belongs to this sequence.
    pub q_start: usize,
    /// New tokens of this sequence in the step.
    pub q_len: usize,
    /// Tokens cached after the step's append.
    pub ctx_len: usize,
    /// KV blocks of the sequence, in order, covering `ctx_len` tokens.
    pub block_table: Vec<u32>,
}

/// Host description of one forward pass.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepMeta {
    /// Token ids, all sequences' new tokens concatenated.
    pub tokens: Vec<u32>,
    /// RoPE position of each token.
    pub positions: Vec<u32>,
    /// KV slot (`block * block_size + offset`) each token is written to.
    pub slots: Vec<u32>,
    pub seqs: Vec<SeqMeta>,
    /// Rows (indices into `tokens`) whose logits are needed, ascending.
    pub logit_rows: Vec<u32>,
}

/// Rows of an activation an op runs on (a nano-batch).
pub type RowRange = std::ops::Range<usize>;

/// One layer's queries and cache as host memory, for the sparse attention
/// policies, which select on the CPU (`engine::sparse`).
#[derive(Debug, Clone, Copy)]
pub struct HostLayerView<'a> {
    /// Fused `[q | k | v]` rows of the step, `row_len` wide.
    pub qkv: &'a [f32],
    pub row_len: usize,
    pub kv: tacflow_kernels::cpu::KvLayer<'a>,
}

/// Per sequence of a step: the slots each KV head attends, or `None` for
/// full attention.
pub type Selections = [Option<Vec<Vec<u32>>>];

/// A decode entry whose Tactic state the backend keeps
/// ([`Backend::device_tactic`]): the backend selects and attends for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TacticEntry {
    /// Index into the step's sequences.
    pub seq: usize,
    /// The backend's name for the sequence's state.
    pub state: tactic::StateId,
    /// The entry's row in the step: its one decode token, or the last
    /// token of its prompt (`prompt_end`).
    pub row: usize,
    /// Tokens cached, this step's included.
    pub ctx_len: usize,
    /// The row ends the sequence's prompt (a chunk of two tokens or more
    /// that samples): the backend builds the state's clustering over every
    /// cached key (`ctx_len`, the row's own included: the keys the first
    /// decode step would cluster), selects nothing and lets the chunk
    /// attend in full. The first decode step then only selects.
    pub prompt_end: bool,
    /// The sequence asked for diagnostics: the backend measures what the
    /// selection kept ([`Backend::tactic_diagnostics`]).
    pub diagnostics: bool,
    /// `Some`: the entry runs a baseline on the device
    /// ([`Backend::device_baselines`]), which keeps no state (`state`
    /// unused); `None`: Tactic on `state`.
    pub baseline: Option<Baseline>,
}

/// A baseline policy a backend selects for on its device, without state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Baseline {
    /// `oracle_top_p`: the exact smallest set reaching `p`.
    Oracle { p: f32 },
    /// `fixed_budget`: Quest's pages up to `tokens`, the page bounds
    /// computed from the keys at each step.
    Budget { tokens: usize },
}

/// What sampling returns for the logit rows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SampleOutput {
    /// One per logit row: `Some` where sampling was asked for.
    pub sampled: Vec<Option<Sampled>>,
    /// `[rows, vocab]` row-major, when asked for.
    pub logits: Option<Vec<f32>>,
}

/// The model's side of a forward pass run through a captured graph
/// ([`Backend::forward_graph`]): the backend keeps the workspace and the
/// step, the model says what they hold and issues the ops.
pub trait GraphPass<B: Backend> {
    /// Vocabulary size (a captured step's tokens are checked against it).
    fn vocab(&self) -> usize;
    /// The activations of a pass of `rows` token rows, every one of them a
    /// logit row (a bucket's persistent workspace).
    fn workspace(&self, b: &B, rows: usize) -> Result<Workspace<B>>;
    /// Issues every op of the pass, in the sequential schedule, over the
    /// `rows` rows of `step` and `ws`; it allocates nothing once `ws` has
    /// been written by one pass.
    fn issue(
        &mut self,
        b: &B,
        step: &B::Step,
        rows: usize,
        kv: &mut B::Kv,
        ws: &mut Workspace<B>,
    ) -> Result<()>;
}

/// The ops of a Llama-family decoder. Every op is asynchronous on a GPU
/// backend: only [`Backend::sample`] returns host data, and it is where a
/// step synchronises.
pub trait Backend {
    /// An activation matrix `[rows, cols]`, row-major.
    type Act;
    /// A weight matrix `[rows, cols]` (PyTorch `nn.Linear` layout: rows are
    /// output features).
    type Matrix;
    type Vector;
    /// Every layer's K and V blocks.
    type Kv;
    /// A step's metadata as the backend keeps it (on the device for a GPU).
    type Step;
    /// An ordering point between lanes (a CUDA event on the GPU).
    type Event;

    /// `"cpu"` or `"cuda"`, and the device in words.
    fn describe(&self) -> (String, String);
    /// Data type the weights are held in.
    fn weight_dtype(&self) -> &'static str;
    /// Bytes a weight takes as the backend holds it (what a model's size
    /// is checked against before it loads).
    fn weight_bytes(&self) -> usize;
    /// Bytes of device memory free for the KV cache; `None` when unbounded
    /// (the CPU), so the operator must size it.
    fn free_memory(&self) -> Option<usize>;
    /// Bytes one KV block takes over all layers, K and V.
    fn kv_block_bytes(&self, layout: &KvLayout) -> usize;
    /// Whether the device can still run work, asked after an op failed:
    /// `Err(why)` when it cannot (a GPU context hit by a sticky fault: an
    /// illegal address, a launch failure, a lost device), and then the
    /// daemon goes down rather than keep a dead context. The CPU never
    /// fails this way.
    fn check_device(&self) -> std::result::Result<(), String> {
        Ok(())
    }
    /// Launches a kernel that stores to an address no allocation holds: a
    /// genuine illegal-address fault, sticky for the context, which the
    /// next synchronisation reports (fault injection's `illegal_address`,
    /// `faults.rs`). `Ok` means the launch was accepted, not that the
    /// fault has struck yet. A backend with no device refuses.
    #[cfg(any(test, feature = "fault-injection"))]
    fn provoke_illegal_address(&self) -> Result<()> {
        Err(crate::error::Error::Backend(
            "this backend has no device to fault".into(),
        ))
    }

    fn matrix(&self, rows: usize, cols: usize, data: HostData<'_>) -> Result<Self::Matrix>;
    fn vector(&self, len: usize, data: HostData<'_>) -> Result<Self::Vector>;
    /// f32 constants that are not weights (RoPE's inverse frequencies): held
    /// exactly, never rounded to the weight dtype, so that a bf16 backend
    /// rotates by the same angles as the f32 reference.
    fn constants(&self, data: &[f32]) -> Result<Self::Vector>;
    fn kv_cache(&self, layout: &KvLayout) -> Result<Self::Kv>;
    fn act(&self, rows: usize, cols: usize) -> Result<Self::Act>;

    fn begin_step(&self, meta: &StepMeta) -> Result<Self::Step>;

    /// How many lanes the backend runs at once; a schedule with more is
    /// refused. The CPU runs every op as it is issued, so any number of
    /// lanes is one stream of work to it.
    fn lanes(&self) -> usize {
        1
    }
    /// Issues the ops that follow on `lane` (on a GPU: its stream, cuBLAS
    /// handle and workspaces).
    fn use_lane(&self, lane: usize) -> Result<()>;
    fn new_event(&self) -> Result<Self::Event>;
    /// Marks, on the current lane, the point after the ops issued on it so
    /// far.
    fn signal(&self, event: &Self::Event) -> Result<()>;
    /// The current lane waits for `event`'s point before the ops issued on
    /// it next (the event must have been signalled already).
    fn wait(&self, event: &Self::Event) -> Result<()>;
    /// Names the schedule node whose ops follow, after its waits (a
    /// recording backend logs it; others ignore it).
    fn begin_node(&self, _index: usize, _node: &crate::schedule::Node) {}

    // Every op below runs on `rows`, a range of the rows of its activations
    // (the step's token rows; for `gather_rows`, and the final norm and LM
    // head after it, the logit rows), so that one op can be cut into
    // nano-batches on several lanes.

    /// `out[t] = table[tokens[t]]`.
    fn embed(
        &self,
        step: &Self::Step,
        table: &Self::Matrix,
        out: &mut Self::Act,
        rows: RowRange,
    ) -> Result<()>;
    fn rmsnorm(
        &self,
        x: &Self::Act,
        w: &Self::Vector,
        eps: f32,
        out: &mut Self::Act,
        rows: RowRange,
    ) -> Result<()>;
    /// `out = x · wᵀ`.
    fn linear(
        &self,
        x: &Self::Act,
        w: &Self::Matrix,
        out: &mut Self::Act,
        rows: RowRange,
    ) -> Result<()>;
    /// `x[t] += b` for every row.
    fn add_bias(&self, x: &mut Self::Act, b: &Self::Vector, rows: RowRange) -> Result<()>;
    /// Rotates the q and k heads of fused `[q | k | v]` rows by each token's
    /// position; `inv_freq` holds `head_dim / 2` inverse frequencies.
    fn rope(
        &self,
        step: &Self::Step,
        qkv: &mut Self::Act,
        inv_freq: &Self::Vector,
        dims: AttnDims,
        rows: RowRange,
    ) -> Result<()>;
    /// Writes the step's k and v rows into their KV slots of `layer`.
    fn kv_append(
        &self,
        step: &Self::Step,
        qkv: &Self::Act,
        kv: &mut Self::Kv,
        layer: usize,
        dims: AttnDims,
        rows: RowRange,
    ) -> Result<()>;
    /// Causal attention of the step's queries over their sequences' cache:
    /// row `r` sees its sequence's keys up to its own position, including
    /// the keys this step appends for earlier rows of that sequence (which
    /// must have been appended by then).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        step: &Self::Step,
        qkv: &Self::Act,
        kv: &Self::Kv,
        layer: usize,
        dims: AttnDims,
        out: &mut Self::Act,
        rows: RowRange,
    ) -> Result<()>;
    /// Whether [`Backend::host_view`] and [`Backend::sparse_attention`] work,
    /// i.e. whether sequences may use sparse attention policies.
    fn supports_sparse(&self) -> bool {
        false
    }
    /// The layer's queries and cache as host memory, when the backend keeps
    /// them there (sparse policies select on it). `None` by default.
    fn host_view<'a>(
        &self,
        _qkv: &'a Self::Act,
        _kv: &'a Self::Kv,
        _layer: usize,
    ) -> Option<HostLayerView<'a>> {
        None
    }
    /// Attention where some sequences attend only selected slots. Backends
    /// without sparse attention refuse it (the engine offers sparse policies
    /// only where [`Backend::host_view`] is available).
    #[allow(clippy::too_many_arguments)]
    fn sparse_attention(
        &self,
        _step: &Self::Step,
        _qkv: &Self::Act,
        _kv: &Self::Kv,
        _layer: usize,
        _dims: AttnDims,
        _selections: &Selections,
        _out: &mut Self::Act,
        _rows: RowRange,
    ) -> Result<()> {
        Err(crate::error::Error::Backend(
            "this backend runs full attention only".into(),
        ))
    }

    // Tactic on the backend's own device: each Tactic sequence's state
    // (clusterings) is the backend's, named by the engine, grown and read
    // by the backend's kernels inside `tactic_attention`, with no host
    // view and no synchronisation. A step's changes to the states stand
    // once the engine ends the step with `commit`; a failed step's are
    // undone. Off by default: those backends select on host views
    // (`host_view`, `sparse_attention`) or serve full attention only.

    /// Whether Tactic sequences keep their state on this backend.
    fn device_tactic(&self) -> bool {
        false
    }
    /// Whether `oracle_top_p` and `fixed_budget` select on this backend's
    /// device, inside `tactic_attention` (entries with a `baseline`), as
    /// Tactic does.
    fn device_baselines(&self) -> bool {
        false
    }
    /// A new Tactic state `id` (no clustering yet) for a model of `dims`
    /// with `layers` layers.
    fn tactic_open(
        &self,
        _id: tactic::StateId,
        _params: &tacflow_kernels::tactic::TacticParams,
        _dims: AttnDims,
        _layers: usize,
    ) -> Result<()> {
        Err(crate::error::Error::Backend(
            "this backend keeps no Tactic state".into(),
        ))
    }
    /// State `child` shares `parent`'s clusterings (a fork).
    fn tactic_fork(&self, _parent: tactic::StateId, _child: tactic::StateId) -> Result<()> {
        Err(crate::error::Error::Backend(
            "this backend keeps no Tactic state".into(),
        ))
    }
    /// Forgets state `id`'s clusterings (a truncation).
    fn tactic_reset(&self, _id: tactic::StateId) {}
    /// Drops state `id` (the sequence closed).
    fn tactic_close(&self, _id: tactic::StateId) {}
    /// [`Backend::attention`] where the `entries` (decode rows inside
    /// `rows`) attend only the slots their Tactic state selects; the other
    /// rows of `rows` attend in full.
    #[allow(clippy::too_many_arguments)]
    fn tactic_attention(
        &self,
        _step: &Self::Step,
        _qkv: &Self::Act,
        _kv: &Self::Kv,
        _layer: usize,
        _dims: AttnDims,
        _entries: &[TacticEntry],
        _out: &mut Self::Act,
        _rows: RowRange,
    ) -> Result<()> {
        Err(crate::error::Error::Backend(
            "this backend keeps no Tactic state".into(),
        ))
    }
    /// What the selections of the entries with `diagnostics` kept, one
    /// measure per (entry, layer, KV head), since the step began: read
    /// back once, after the forward pass (the one wait the diagnostic
    /// mode adds). Called only when some entry asked for them.
    fn tactic_diagnostics(&self) -> Result<Vec<tactic::TacticMeasure>> {
        Err(crate::error::Error::Backend(
            "this backend measures no Tactic diagnostics".into(),
        ))
    }
    /// Ends a step: its changes to the Tactic states stand (`commit`) or
    /// are undone (and measures not read are dropped).
    fn tactic_end_step(&self, _commit: bool) {}
    /// Bytes the Tactic states hold on the device.
    fn tactic_bytes(&self) -> usize {
        0
    }

    /// `x += y`.
    fn add(&self, x: &mut Self::Act, y: &Self::Act, rows: RowRange) -> Result<()>;
    /// SwiGLU over rows `[gate | up]`.
    fn silu_mul(&self, gate_up: &Self::Act, out: &mut Self::Act, rows: RowRange) -> Result<()>;

    // Fused ops: each does what two of the ops above do, in one pass where
    // the backend has a kernel for it. The default composes the two ops, so
    // every backend has each one and its result is defined by the
    // composition; an override must equal it (bit for bit in f32: the
    // fused kernels repeat the unfused arithmetic in the same order). The
    // forward pass does not use them yet.

    /// The residual add and the next RMSNorm: on `rows` only, `x += y`,
    /// then `out = x / sqrt(mean(x²) + eps) * w` of the updated `x`, i.e.
    /// [`Backend::add`] then [`Backend::rmsnorm`]. `x`, `y` and `out` are
    /// `[n, dim]` and `w` holds `dim`; `x` (the f32 residual stream) is
    /// read and written, `y` read, `out` written in the dtype `rmsnorm`
    /// writes on this backend (bf16 on the CUDA backend in bf16 activation
    /// mode, else f32). Rows outside `rows` are not touched.
    #[allow(clippy::too_many_arguments)]
    fn add_rmsnorm(
        &self,
        x: &mut Self::Act,
        y: &Self::Act,
        w: &Self::Vector,
        eps: f32,
        out: &mut Self::Act,
        rows: RowRange,
    ) -> Result<()> {
        self.add(x, y, rows.clone())?;
        self.rmsnorm(x, w, eps, out, rows)
    }

    /// RoPE and the KV append: on `rows` only, rotates the q and k heads
    /// of the fused `[q | k | v]` rows of `qkv` by each row's position
    /// (in place, as [`Backend::rope`]), then writes each row's rotated k
    /// and its v to its slot of `layer` (as [`Backend::kv_append`]; in
    /// bf16 on the CUDA backend). Reads the step's positions and slots of
    /// those rows; writes nothing else.
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_append(
        &self,
        step: &Self::Step,
        qkv: &mut Self::Act,
        inv_freq: &Self::Vector,
        kv: &mut Self::Kv,
        layer: usize,
        dims: AttnDims,
        rows: RowRange,
    ) -> Result<()> {
        self.rope(step, qkv, inv_freq, dims, rows.clone())?;
        self.kv_append(step, qkv, kv, layer, dims, rows)
    }

    /// SwiGLU whose output is the down projection's input: as
    /// [`Backend::silu_mul`] on `rows`, written in the dtype this
    /// backend's [`Backend::linear`] reads without converting it (bf16
    /// values, rounded once, on the CUDA backend in bf16 activation mode:
    /// the cast fused into the activation; f32 otherwise).
    fn silu_mul_gemm_input(
        &self,
        gate_up: &Self::Act,
        out: &mut Self::Act,
        rows: RowRange,
    ) -> Result<()> {
        self.silu_mul(gate_up, out, rows)
    }
    /// `out[i] = x[step.logit_rows[i]]` for the logit rows `i` in `rows`.
    fn gather_rows(
        &self,
        step: &Self::Step,
        x: &Self::Act,
        out: &mut Self::Act,
        rows: RowRange,
    ) -> Result<()>;
    /// Samples the rows of `logits` whose `params` are `Some`, and returns
    /// the logits to the host when `want_logits`.
    fn sample(
        &self,
        logits: &Self::Act,
        params: &[Option<SampleParams>],
        want_logits: bool,
    ) -> Result<SampleOutput>;
    /// [`Backend::sample`] with vLLM's logits processing (penalties, logit
    /// bias, `min_p`) for the rows whose `procs` entry is `Some`. A backend
    /// that does not implement it keeps this default, which refuses such
    /// rows; the engine refuses the options at `open_sequence` already when
    /// [`Backend::supports_processing`] is false.
    fn sample_processed(
        &self,
        logits: &Self::Act,
        params: &[Option<SampleParams>],
        procs: &[Option<Processing>],
        want_logits: bool,
    ) -> Result<SampleOutput> {
        if procs.iter().any(Option::is_some) {
            return Err(crate::error::Error::Protocol(ErrorReply::new(
                ErrorCode::Unsupported,
                "this backend does not implement penalties, logit bias or min_p",
            )));
        }
        self.sample(logits, params, want_logits)
    }
    /// Whether [`Backend::sample_processed`] implements the processing.
    fn supports_processing(&self) -> bool {
        false
    }
    /// Copies whole blocks (every layer, K and V): `(src, dst)` pairs, for
    /// copy-on-write of forked sequences.
    fn copy_blocks(&self, kv: &mut Self::Kv, pairs: &[(u32, u32)]) -> Result<()>;

    // The graph path: a pure decode step replayed from a graph captured
    // for its batch-size bucket (the CUDA backend with `cuda_graphs` on).
    // By default there are no graphs and every step runs its ops eagerly.

    /// Whether the step `meta` runs through [`Backend::forward_graph`].
    /// Asked only for a step the model could run that way (no sparse
    /// selection on the host, the sequential schedule).
    fn graph_step(&self, _meta: &StepMeta) -> bool {
        false
    }
    /// The forward pass of `meta` through its bucket's graph (warming up,
    /// capturing or replaying it): the logits of `meta.logit_rows`, as
    /// the eager pass returns them.
    fn forward_graph(
        &self,
        _meta: &StepMeta,
        _kv: &mut Self::Kv,
        _pass: &mut dyn GraphPass<Self>,
    ) -> Result<Self::Act>
    where
        Self: Sized,
    {
        Err(crate::error::Error::Backend(
            "this backend runs no graphs".into(),
        ))
    }
    /// Whether the backend needs a KV block that no sequence will ever
    /// own: the padding rows of its captured steps write there.
    fn wants_pad_block(&self) -> bool {
        false
    }
    /// The block the engine reserved for it, before the first step.
    fn set_pad_block(&mut self, _block: u32) {}
}
