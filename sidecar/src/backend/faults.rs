//! A backend that fails on command, for tests of what a failed step leaves
//! behind (every sequence as it was) and of how the daemon reacts to a
//! failing or lost device. Built only for tests and with the
//! `fault-injection` feature: a release daemon has none of it.
//!
//! Every fault but one is simulated here, in the wrapper. `illegal_address`
//! is real: the wrapped backend launches a kernel that faults its device
//! (CUDA only), and the daemon must find that out by itself.
//!
//! [`Faulty`] wraps any [`Backend`], counts its ops, and fails the op a
//! [`FaultPlan`] names. `describe`, `weight_dtype`, `free_memory`,
//! `kv_block_bytes`, `check_device` and `supports_sparse` are queries, not
//! ops: they are neither counted nor failed.

use super::recording::{Recorder, Tagged};
use super::tactic::StateId;
use super::{
    AttnDims, Backend, HostData, HostLayerView, KvLayout, RowRange, SampleOutput, Selections,
    StepMeta, TacticEntry,
};
use crate::error::{Error, Result};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use tacflow_kernels::cpu::{Processing, SampleParams};

/// What happens at the chosen op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The op returns `Err` (a recoverable failure).
    Error,
    /// The op panics.
    Panic,
    /// The op fails, every later op fails too, and `check_device` says the
    /// device is gone (as a sticky CUDA fault would).
    DeviceLost,
    /// Before the op, the wrapped backend launches a real kernel that
    /// stores to an unmapped device address
    /// ([`Backend::provoke_illegal_address`]); then the op runs as usual.
    /// Nothing is simulated: the context takes a sticky illegal-address
    /// fault, the next synchronisation reports it, and the wrapped
    /// backend's own `check_device` finds it.
    IllegalAddress,
}

impl Fault {
    /// Whether the fault happens on a real device (so the CPU backend
    /// cannot run it).
    pub fn needs_device(self) -> bool {
        matches!(self, Fault::IllegalAddress)
    }
}

/// Which op fails, counted from arming, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The n-th backend op.
    Op(u64),
    /// The first op (`begin_step`) of the n-th step.
    Step(u64),
}

/// A fault and where it strikes: `panic@step:2`, `device_lost@op:40`,
/// `error@op:7`, `illegal_address@step:3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    pub fault: Fault,
    pub at: Trigger,
}

impl std::str::FromStr for FaultPlan {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<FaultPlan, String> {
        let usage = "expected <error|panic|device_lost|illegal_address>@<op|step>:<n>, \
                     n from 1, as in panic@step:2";
        let bad = |why: &str| format!("fault plan {s:?}: {why}; {usage}");
        let (fault, at) = s.split_once('@').ok_or_else(|| bad("no '@'"))?;
        let fault = match fault.trim() {
            "error" => Fault::Error,
            "panic" => Fault::Panic,
            "device_lost" => Fault::DeviceLost,
            "illegal_address" => Fault::IllegalAddress,
            other => return Err(bad(&format!("unknown fault {other:?}"))),
        };
        let (kind, n) = at.split_once(':').ok_or_else(|| bad("no ':'"))?;
        let n: u64 = n
            .trim()
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| bad(&format!("{n:?} is not a count from 1")))?;
        let at = match kind.trim() {
            "op" => Trigger::Op(n),
            "step" => Trigger::Step(n),
            other => return Err(bad(&format!("unknown trigger {other:?}"))),
        };
        Ok(FaultPlan { fault, at })
    }
}

/// The test backend: delegates every op to `inner`, fails the one its plan
/// names, and records what it was asked of a schedule's run (its
/// [`Recorder`], off until started). Backend methods take `&self`, so the
/// counters are atomics (and the wrapper stays `Send + Sync` like the
/// backend it wraps).
#[derive(Debug)]
pub struct Faulty<B> {
    inner: B,
    pub recorder: Recorder,
    plan: Mutex<Option<FaultPlan>>,
    ops: AtomicU64,
    steps: AtomicU64,
    fired: AtomicBool,
    lost: AtomicBool,
    /// Asks the engine for a padding block, as a backend with graphs does
    /// (tests of the reservation); the block it got.
    want_pad: bool,
    pad_block: Option<u32>,
}

impl<B: Backend> Faulty<B> {
    pub fn new(inner: B) -> Faulty<B> {
        Faulty {
            inner,
            recorder: Recorder::default(),
            plan: Mutex::new(None),
            ops: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            fired: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            want_pad: false,
            pad_block: None,
        }
    }

    /// Wants a padding KV block from the engine (`Backend::wants_pad_block`).
    pub fn wanting_pad_block(mut self) -> Faulty<B> {
        self.want_pad = true;
        self
    }

    /// The padding block the engine reserved.
    pub fn pad_block(&self) -> Option<u32> {
        self.pad_block
    }

    /// Arms `plan`; op and step counts start again from here.
    pub fn arm(&self, plan: FaultPlan) {
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = Some(plan);
        self.ops.store(0, SeqCst);
        self.steps.store(0, SeqCst);
        self.fired.store(false, SeqCst);
    }

    /// No further fault fires (a lost device stays lost).
    pub fn disarm(&self) {
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Whether the armed fault has struck.
    pub fn fired(&self) -> bool {
        self.fired.load(SeqCst)
    }

    /// Ops counted since arming (or since `new`).
    pub fn ops(&self) -> u64 {
        self.ops.load(SeqCst)
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Counts one op (`begin` when it is a step's first) and says whether
    /// it fails: `Err` to return, or a panic. A real fault is launched
    /// here, and the op goes on.
    fn tick(&self, name: &str, begin: bool) -> Result<()> {
        let op = self.ops.fetch_add(1, SeqCst) + 1;
        let step = if begin {
            self.steps.fetch_add(1, SeqCst) + 1
        } else {
            0
        };
        if self.lost.load(SeqCst) {
            return Err(lost(name));
        }
        let plan = *self.plan.lock().unwrap_or_else(|e| e.into_inner());
        let Some(plan) = plan else { return Ok(()) };
        let hit = match plan.at {
            Trigger::Op(n) => op == n,
            Trigger::Step(n) => begin && step == n,
        };
        if !hit {
            return Ok(());
        }
        self.fired.store(true, SeqCst);
        match plan.fault {
            Fault::Error => Err(Error::Backend(format!(
                "injected error in {name} (op {op})"
            ))),
            Fault::Panic => panic!("injected panic in {name} (op {op})"),
            Fault::DeviceLost => {
                self.lost.store(true, SeqCst);
                Err(lost(name))
            }
            Fault::IllegalAddress => {
                self.inner.provoke_illegal_address()?;
                tracing::warn!(
                    op,
                    name,
                    "injected fault: a store to an unmapped device address was launched"
                );
                Ok(())
            }
        }
    }
}

fn lost(name: &str) -> Error {
    Error::Backend(format!("injected device loss: {name} failed"))
}

impl<B: Backend> Backend for Faulty<B> {
    type Act = B::Act;
    type Matrix = B::Matrix;
    type Vector = B::Vector;
    type Kv = B::Kv;
    type Step = B::Step;
    type Event = Tagged<B::Event>;

    fn describe(&self) -> (String, String) {
        let (kind, device) = self.inner.describe();
        (kind, format!("{device} (fault injection)"))
    }

    fn weight_dtype(&self) -> &'static str {
        self.inner.weight_dtype()
    }

    fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes()
    }

    fn free_memory(&self) -> Option<usize> {
        self.inner.free_memory()
    }

    fn kv_block_bytes(&self, layout: &KvLayout) -> usize {
        self.inner.kv_block_bytes(layout)
    }

    fn check_device(&self) -> std::result::Result<(), String> {
        if self.lost.load(SeqCst) {
            return Err("the device was lost (injected fault)".into());
        }
        self.inner.check_device()
    }

    fn provoke_illegal_address(&self) -> Result<()> {
        self.inner.provoke_illegal_address()
    }

    fn matrix(&self, rows: usize, cols: usize, data: HostData<'_>) -> Result<B::Matrix> {
        self.tick("matrix", false)?;
        self.inner.matrix(rows, cols, data)
    }

    fn vector(&self, len: usize, data: HostData<'_>) -> Result<B::Vector> {
        self.tick("vector", false)?;
        self.inner.vector(len, data)
    }

    fn constants(&self, data: &[f32]) -> Result<B::Vector> {
        self.tick("constants", false)?;
        self.inner.constants(data)
    }

    fn kv_cache(&self, layout: &KvLayout) -> Result<B::Kv> {
        self.tick("kv_cache", false)?;
        self.inner.kv_cache(layout)
    }

    fn act(&self, rows: usize, cols: usize) -> Result<B::Act> {
        self.tick("act", false)?;
        self.inner.act(rows, cols)
    }

    fn begin_step(&self, meta: &StepMeta) -> Result<B::Step> {
        self.tick("begin_step", true)?;
        self.recorder.begin_step(meta);
        self.inner.begin_step(meta)
    }

    fn lanes(&self) -> usize {
        self.inner.lanes()
    }

    fn use_lane(&self, lane: usize) -> Result<()> {
        self.tick("use_lane", false)?;
        self.recorder.use_lane(lane);
        self.inner.use_lane(lane)
    }

    fn new_event(&self) -> Result<Tagged<B::Event>> {
        self.tick("new_event", false)?;
        let inner = self.inner.new_event()?;
        Ok(Tagged {
            id: self.recorder.new_event(),
            inner,
        })
    }

    fn signal(&self, event: &Tagged<B::Event>) -> Result<()> {
        self.tick("signal", false)?;
        self.recorder.signal(event.id);
        self.inner.signal(&event.inner)
    }

    fn wait(&self, event: &Tagged<B::Event>) -> Result<()> {
        self.tick("wait", false)?;
        self.recorder.wait(event.id);
        self.inner.wait(&event.inner)
    }

    fn begin_node(&self, index: usize, node: &crate::schedule::Node) {
        self.recorder.begin_node(index, node);
        self.inner.begin_node(index, node)
    }

    fn embed(
        &self,
        step: &B::Step,
        table: &B::Matrix,
        out: &mut B::Act,
        rows: RowRange,
    ) -> Result<()> {
        self.tick("embed", false)?;
        self.recorder.op("embed", &rows);
        self.inner.embed(step, table, out, rows)
    }

    fn rmsnorm(
        &self,
        x: &B::Act,
        w: &B::Vector,
        eps: f32,
        out: &mut B::Act,
        rows: RowRange,
    ) -> Result<()> {
        self.tick("rmsnorm", false)?;
        self.recorder.op("rmsnorm", &rows);
        self.inner.rmsnorm(x, w, eps, out, rows)
    }

    fn linear(&self, x: &B::Act, w: &B::Matrix, out: &mut B::Act, rows: RowRange) -> Result<()> {
        self.tick("linear", false)?;
        self.recorder.op("linear", &rows);
        self.inner.linear(x, w, out, rows)
    }

    fn add_bias(&self, x: &mut B::Act, b: &B::Vector, rows: RowRange) -> Result<()> {
        self.tick("add_bias", false)?;
        self.recorder.op("add_bias", &rows);
        self.inner.add_bias(x, b, rows)
    }

    fn rope(
        &self,
        step: &B::Step,
        qkv: &mut B::Act,
        inv_freq: &B::Vector,
        dims: AttnDims,
        rows: RowRange,
    ) -> Result<()> {
        self.tick("rope", false)?;
        self.recorder.op("rope", &rows);
        self.inner.rope(step, qkv, inv_freq, dims, rows)
    }

    fn kv_append(
        &self,
        step: &B::Step,
        qkv: &B::Act,
        kv: &mut B::Kv,
        layer: usize,
        dims: AttnDims,
        rows: RowRange,
    ) -> Result<()> {
        self.tick("kv_append", false)?;
        self.recorder.op("kv_append", &rows);
        self.inner.kv_append(step, qkv, kv, layer, dims, rows)
    }

    fn attention(
        &self,
        step: &B::Step,
        qkv: &B::Act,
        kv: &B::Kv,
        layer: usize,
        dims: AttnDims,
        out: &mut B::Act,
        rows: RowRange,
    ) -> Result<()> {
        self.tick("attention", false)?;
        self.recorder.op("attention", &rows);
        self.inner.attention(step, qkv, kv, layer, dims, out, rows)
    }

    fn supports_sparse(&self) -> bool {
        self.inner.supports_sparse()
    }

    /// An op like the others: a failed one returns `None`, which the
    /// engine's selector turns into an error.
    fn host_view<'a>(
        &self,
        qkv: &'a B::Act,
        kv: &'a B::Kv,
        layer: usize,
    ) -> Option<HostLayerView<'a>> {
        self.tick("host_view", false).ok()?;
        self.inner.host_view(qkv, kv, layer)
    }

    fn sparse_attention(
        &self,
        step: &B::Step,
        qkv: &B::Act,
        kv: &B::Kv,
        layer: usize,
        dims: AttnDims,
        selections: &Selections,
        out: &mut B::Act,
        rows: RowRange,
    ) -> Result<()> {
        self.tick("sparse_attention", false)?;
        self.recorder.op("sparse_attention", &rows);
        self.inner
            .sparse_attention(step, qkv, kv, layer, dims, selections, out, rows)
    }

    // The Tactic state calls are bookkeeping, not ops (neither counted nor
    // failed); `tactic_attention` is an op like `sparse_attention`.

    fn device_tactic(&self) -> bool {
        self.inner.device_tactic()
    }

    fn device_baselines(&self) -> bool {
        self.inner.device_baselines()
    }

    fn tactic_open(
        &self,
        id: StateId,
        params: &tacflow_kernels::tactic::TacticParams,
        dims: AttnDims,
        layers: usize,
    ) -> Result<()> {
        self.inner.tactic_open(id, params, dims, layers)
    }

    fn tactic_fork(&self, parent: StateId, child: StateId) -> Result<()> {
        self.inner.tactic_fork(parent, child)
    }

    fn tactic_reset(&self, id: StateId) {
        self.inner.tactic_reset(id)
    }

    fn tactic_close(&self, id: StateId) {
        self.inner.tactic_close(id)
    }

    fn tactic_attention(
        &self,
        step: &B::Step,
        qkv: &B::Act,
        kv: &B::Kv,
        layer: usize,
        dims: AttnDims,
        entries: &[TacticEntry],
        out: &mut B::Act,
        rows: RowRange,
    ) -> Result<()> {
        self.tick("tactic_attention", false)?;
        self.recorder.op("tactic_attention", &rows);
        self.inner
            .tactic_attention(step, qkv, kv, layer, dims, entries, out, rows)
    }

    fn tactic_diagnostics(&self) -> Result<Vec<crate::backend::tactic::TacticMeasure>> {
        self.inner.tactic_diagnostics()
    }

    fn tactic_end_step(&self, commit: bool) {
        self.inner.tactic_end_step(commit)
    }

    fn tactic_bytes(&self) -> usize {
        self.inner.tactic_bytes()
    }

    fn add(&self, x: &mut B::Act, y: &B::Act, rows: RowRange) -> Result<()> {
        self.tick("add", false)?;
        self.recorder.op("add", &rows);
        self.inner.add(x, y, rows)
    }

    fn silu_mul(&self, gate_up: &B::Act, out: &mut B::Act, rows: RowRange) -> Result<()> {
        self.tick("silu_mul", false)?;
        self.recorder.op("silu_mul", &rows);
        self.inner.silu_mul(gate_up, out, rows)
    }

    fn gather_rows(
        &self,
        step: &B::Step,
        x: &B::Act,
        out: &mut B::Act,
        rows: RowRange,
    ) -> Result<()> {
        self.tick("gather_rows", false)?;
        self.recorder.op("gather_rows", &rows);
        self.inner.gather_rows(step, x, out, rows)
    }

    fn sample(
        &self,
        logits: &B::Act,
        params: &[Option<SampleParams>],
        want_logits: bool,
    ) -> Result<SampleOutput> {
        self.tick("sample", false)?;
        self.inner.sample(logits, params, want_logits)
    }

    fn sample_processed(
        &self,
        logits: &B::Act,
        params: &[Option<SampleParams>],
        procs: &[Option<Processing>],
        want_logits: bool,
    ) -> Result<SampleOutput> {
        self.tick("sample", false)?;
        self.inner
            .sample_processed(logits, params, procs, want_logits)
    }

    fn supports_processing(&self) -> bool {
        self.inner.supports_processing()
    }

    fn wants_pad_block(&self) -> bool {
        self.want_pad
    }

    fn set_pad_block(&mut self, block: u32) {
        self.pad_block = Some(block);
    }

    fn copy_blocks(&self, kv: &mut B::Kv, pairs: &[(u32, u32)]) -> Result<()> {
        self.tick("copy_blocks", false)?;
        self.inner.copy_blocks(kv, pairs)
    }
}

#[cfg(test)]
#[path = "faults_tests.rs"]
mod tests;
