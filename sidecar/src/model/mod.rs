//! The Llama-family decoder, written once over [`Backend`].
//!
//! | piece | file |
//! | --- | --- |
//! | shapes, `config.json`, presets | [`config`] |
//! | tensor sources (random, safetensors, GGUF) | [`weights`], [`hf`], [`gguf`] |
//! | the forward pass: each op of a schedule node over its rows | this file |

pub mod capture;
pub mod config;
pub mod gguf;
pub mod hf;
pub mod weights;

use crate::backend::{AttnDims, Backend, GraphPass, StepMeta};
use crate::engine::sparse::Selector;
use crate::error::{Error, Result};
use crate::schedule::program::{Fusions, Program};
use crate::schedule::{Node, Op, Plan, Schedule, build, order, run};
use config::ModelConfig;
use std::path::Path;
use tacflow_kernels::cpu::{RopeScaling, rope_inv_freq};
use weights::{RandomSource, WeightKey, WeightSource};

/// One decoder layer's weights.
pub struct Layer<B: Backend> {
    attn_norm: B::Vector,
    qkv: B::Matrix,
    qkv_bias: Option<B::Vector>,
    o: B::Matrix,
    mlp_norm: B::Vector,
    gate_up: B::Matrix,
    down: B::Matrix,
}

/// A loaded model on a backend.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    embed: B::Matrix,
    layers: Vec<Layer<B>>,
    final_norm: B::Vector,
    lm_head: Option<B::Matrix>,
    inv_freq: B::Vector,
    /// Which pairs of ops run fused (none unless configured).
    pub fusions: Fusions,
    /// When set, every attention op records its rows' post-RoPE q and k
    /// (`capture-qk`); the forward pass takes `&self`, hence the cell.
    pub capture: std::cell::RefCell<Option<capture::QkCapture>>,
}

/// How to find a model: `tiny`, `random:<preset or config.json>`, a Hugging
/// Face folder, or a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    /// A preset or config with seeded random weights.
    Random {
        config: ModelConfig,
        seed: u64,
    },
    HfFolder(std::path::PathBuf),
    /// A llama.cpp GGUF file (a path ending in `.gguf`).
    Gguf(std::path::PathBuf),
}

impl ModelSpec {
    /// Parses the `--model` argument.
    pub fn parse(s: &str, seed: u64) -> Result<ModelSpec> {
        if let Some(rest) = s.strip_prefix("random:") {
            let config = match ModelConfig::preset(rest) {
                Some(c) => c,
                None if Path::new(rest).is_file() => ModelConfig::from_hf_file(Path::new(rest))?,
                None => {
                    return Err(Error::Config(format!(
                        "random:{rest}: neither a preset ({}) nor a config.json file",
                        ModelConfig::PRESETS.join(", ")
                    )));
                }
            };
            return Ok(ModelSpec::Random { config, seed });
        }
        if let Some(c) = ModelConfig::preset(s)
            && s == "tiny"
        {
            return Ok(ModelSpec::Random { config: c, seed });
        }
        let p = Path::new(s);
        if p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Ok(ModelSpec::Gguf(p.to_owned()));
        }
        if p.is_dir() {
            return Ok(ModelSpec::HfFolder(p.to_owned()));
        }
        Err(Error::Config(format!(
            "--model {s}: not `tiny`, `random:<preset|config.json>`, a model folder, or a .gguf file"
        )))
    }

    /// Opens the weight source.
    pub fn open(&self) -> Result<(ModelConfig, Box<dyn WeightSource>)> {
        match self {
            ModelSpec::Random { config, seed } => Ok((
                config.clone(),
                Box::new(RandomSource {
                    config: config.clone(),
                    seed: *seed,
                }),
            )),
            ModelSpec::HfFolder(dir) => {
                let src = hf::HfSource::open(dir)?;
                Ok((src.config().clone(), Box::new(src)))
            }
            ModelSpec::Gguf(path) => {
                let src = gguf::GgufSource::open(path)?;
                Ok((src.config().clone(), Box::new(src)))
            }
        }
    }
}

/// Activation buffers of one forward pass (`schedule::Buf` names them):
/// fresh per pass, or kept by the caller from pass to pass (a graph's
/// bucket: [`Model::forward_scheduled_in`]).
pub struct Workspace<B: Backend> {
    x: B::Act,
    h: B::Act,
    qkv: B::Act,
    attn: B::Act,
    proj: B::Act,
    gate_up: B::Act,
    act: B::Act,
    sel: B::Act,
    normed: B::Act,
    logits: B::Act,
}

impl<B: Backend> Workspace<B> {
    /// The activations of a pass of `t` token rows and `r` logit rows.
    pub fn new(b: &B, c: &ModelConfig, t: usize, r: usize) -> Result<Workspace<B>> {
        Ok(Workspace {
            x: b.act(t, c.hidden_size)?,
            h: b.act(t, c.hidden_size)?,
            qkv: b.act(t, c.qkv_dim())?,
            attn: b.act(t, c.q_dim())?,
            proj: b.act(t, c.hidden_size)?,
            gate_up: b.act(t, 2 * c.intermediate_size)?,
            act: b.act(t, c.intermediate_size)?,
            sel: b.act(r, c.hidden_size)?,
            normed: b.act(r, c.hidden_size)?,
            logits: b.act(r, c.vocab_size)?,
        })
    }

    /// The logits the last pass wrote, `[r, vocab]`.
    pub fn logits(&self) -> &B::Act {
        &self.logits
    }
}

/// What one node of a pass needs besides the weights.
struct Pass<'p, 's, B: Backend> {
    step: &'p B::Step,
    meta: &'p StepMeta,
    w: &'p mut Workspace<B>,
    selector: Option<&'p mut Selector<'s>>,
}

/// A pure decode step of `meta` as the graph path runs it: padded to its
/// bucket's rows, in the sequential schedule, with full attention.
struct DecodeGraph<'m, B: Backend> {
    model: &'m Model<B>,
    meta: &'m StepMeta,
}

impl<B: Backend> GraphPass<B> for DecodeGraph<'_, B> {
    fn vocab(&self) -> usize {
        self.model.config.vocab_size
    }

    fn workspace(&self, b: &B, rows: usize) -> Result<Workspace<B>> {
        Workspace::new(b, &self.model.config, rows, rows)
    }

    fn issue(
        &mut self,
        b: &B,
        step: &B::Step,
        rows: usize,
        kv: &mut B::Kv,
        ws: &mut Workspace<B>,
    ) -> Result<()> {
        let s = build::sequential(&self.model.program(), rows, rows);
        let order = order::sequential(&s)?;
        let m = self.model;
        m.forward_scheduled_in(b, kv, step, self.meta, None, &s, &order, ws)
    }
}

impl<B: Backend> Model<B> {
    /// Uploads every tensor of `src` to the backend.
    pub fn load(
        b: &B,
        config: &ModelConfig,
        src: &dyn WeightSource,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Model<B>> {
        config.validate()?;
        let all = weights::keys(config);
        let total = all.len();
        let mut done = 0;
        let mut mat = |key: WeightKey| -> Result<B::Matrix> {
            let (r, c) = key.shape(config);
            let t = src.tensor(key)?;
            let m = b.matrix(r, c, t.data());
            done += 1;
            progress(done, total);
            m
        };
        let embed = mat(WeightKey::Embed)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let qkv = mat(WeightKey::Qkv(l))?;
            let o = mat(WeightKey::O(l))?;
            let gate_up = mat(WeightKey::GateUp(l))?;
            let down = mat(WeightKey::Down(l))?;
            layers.push((qkv, o, gate_up, down));
        }
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(mat(WeightKey::LmHead)?)
        };
        let vec = |key: WeightKey| -> Result<B::Vector> {
            let (_, c) = key.shape(config);
            b.vector(c, src.tensor(key)?.data())
        };
        let layers = layers
            .into_iter()
            .enumerate()
            .map(|(l, (qkv, o, gate_up, down))| {
                Ok(Layer {
                    attn_norm: vec(WeightKey::AttnNorm(l))?,
                    qkv,
                    qkv_bias: if config.qkv_bias {
                        Some(vec(WeightKey::QkvBias(l))?)
                    } else {
                        None
                    },
                    o,
                    mlp_norm: vec(WeightKey::MlpNorm(l))?,
                    gate_up,
                    down,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let scaling = config.rope_scaling.map(|s| RopeScaling {
            factor: s.factor,
            low_freq_factor: s.low_freq_factor,
            high_freq_factor: s.high_freq_factor,
            original_max_position_embeddings: s.original_max_position_embeddings as f32,
        });
        let inv = rope_inv_freq(config.head_dim, config.rope_theta, scaling);
        Ok(Model {
            config: config.clone(),
            embed,
            final_norm: vec(WeightKey::FinalNorm)?,
            lm_head,
            inv_freq: b.constants(&inv)?,
            layers,
            fusions: Fusions::default(),
            capture: Default::default(),
        })
    }

    pub fn dims(&self) -> AttnDims {
        AttnDims {
            num_heads: self.config.num_heads,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// The ops of this model's forward pass, in order.
    pub fn program(&self) -> Program {
        Program {
            layers: self.config.num_layers,
            qkv_bias: self.config.qkv_bias,
            fusions: self.fusions,
        }
    }

    /// Runs every layer over the step's tokens and returns the logits of
    /// `meta.logit_rows`, `[rows, vocab]`.
    pub fn forward(&self, b: &B, kv: &mut B::Kv, meta: &StepMeta) -> Result<B::Act> {
        self.forward_with(b, kv, meta, None, &Plan::Sequential)
    }

    /// [`Model::forward`] with sparse decode attention: `selector` chooses,
    /// layer by layer, the slots its sequences' decode tokens attend; `plan`
    /// cuts the pass into a schedule. A step without selection on the
    /// host, in the sequential schedule, that the backend replays as a
    /// graph ([`Backend::graph_step`]) runs through it instead.
    pub fn forward_with(
        &self,
        b: &B,
        kv: &mut B::Kv,
        meta: &StepMeta,
        selector: Option<&mut Selector<'_>>,
        plan: &Plan,
    ) -> Result<B::Act> {
        let dense = selector.as_ref().is_none_or(|s| !s.is_active());
        if dense && *plan == Plan::Sequential && b.graph_step(meta) {
            return b.forward_graph(meta, kv, &mut DecodeGraph { model: self, meta });
        }
        let (s, order) = plan.lay_out(&self.program(), meta)?;
        self.forward_scheduled(b, kv, meta, selector, &s, &order)
    }

    /// The forward pass as `schedule` cuts it, its nodes issued in `order`
    /// (checked by the caller: `schedule::deps::validate`).
    pub fn forward_scheduled(
        &self,
        b: &B,
        kv: &mut B::Kv,
        meta: &StepMeta,
        selector: Option<&mut Selector<'_>>,
        schedule: &Schedule,
        order: &[usize],
    ) -> Result<B::Act> {
        let (t, r) = (meta.tokens.len(), meta.logit_rows.len());
        // The step first, then the activations; dropped in that order too.
        let mut sw = (b.begin_step(meta)?, Workspace::new(b, &self.config, t, r)?);
        self.forward_scheduled_in(b, kv, &sw.0, meta, selector, schedule, order, &mut sw.1)?;
        Ok(sw.1.logits)
    }

    /// [`Model::forward_scheduled`] over a step already begun and a
    /// workspace the caller keeps (sized for the step's rows); the logits
    /// are left in `ws`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_scheduled_in(
        &self,
        b: &B,
        kv: &mut B::Kv,
        step: &B::Step,
        meta: &StepMeta,
        selector: Option<&mut Selector<'_>>,
        schedule: &Schedule,
        order: &[usize],
        ws: &mut Workspace<B>,
    ) -> Result<()> {
        let mut pass = Pass::<B> {
            step,
            meta,
            w: ws,
            selector: selector.filter(|s| s.is_active()),
        };
        run::execute(b, schedule, order, |i| {
            let node = &schedule.nodes[i];
            b.begin_node(i, node);
            // A node over no rows has nothing to do (the final norm and the
            // LM head of a step that samples nothing); its input was never
            // written, and a backend that allocates lazily refuses to read it.
            if node.rows.is_empty() {
                return Ok(());
            }
            self.run_node(b, kv, &mut pass, node)
        })
    }

    /// [`Model::forward_scheduled`], with `observe(i, true)` called on node
    /// `i`'s lane after its waits and before its ops, `observe(i, false)`
    /// after them (`bench-serve` records timing events there). The ops
    /// issued are those of [`Model::forward_scheduled`].
    pub fn forward_observed(
        &self,
        b: &B,
        kv: &mut B::Kv,
        meta: &StepMeta,
        (schedule, order): (&Schedule, &[usize]),
        observe: &mut dyn FnMut(usize, bool) -> Result<()>,
    ) -> Result<B::Act> {
        let (t, r) = (meta.tokens.len(), meta.logit_rows.len());
        let mut sw = (b.begin_step(meta)?, Workspace::new(b, &self.config, t, r)?);
        let mut pass = Pass::<B> {
            step: &sw.0,
            meta,
            w: &mut sw.1,
            selector: None,
        };
        run::execute(b, schedule, order, |i| {
            let node = &schedule.nodes[i];
            observe(i, true)?;
            if !node.rows.is_empty() {
                self.run_node(b, kv, &mut pass, node)?;
            }
            observe(i, false)
        })?;
        Ok(sw.1.logits)
    }

    /// One node: its op over its rows.
    fn run_node(&self, b: &B, kv: &mut B::Kv, p: &mut Pass<'_, '_, B>, node: &Node) -> Result<()> {
        let (c, dims, rows) = (&self.config, self.dims(), node.rows.clone());
        let (w, step) = (&mut *p.w, p.step);
        let layer = |l: usize| &self.layers[l];
        match node.op {
            Op::Embed => b.embed(step, &self.embed, &mut w.x, rows),
            Op::AttnNorm(l) => b.rmsnorm(&w.x, &layer(l).attn_norm, c.rms_norm_eps, &mut w.h, rows),
            Op::Qkv(l) => b.linear(&w.h, &layer(l).qkv, &mut w.qkv, rows),
            Op::QkvBias(l) => match &layer(l).qkv_bias {
                Some(bias) => b.add_bias(&mut w.qkv, bias, rows),
                None => Err(Error::Backend(format!("layer {l} has no QKV bias"))),
            },
            Op::Rope(_) => b.rope(step, &mut w.qkv, &self.inv_freq, dims, rows),
            Op::KvAppend(l) => b.kv_append(step, &w.qkv, kv, l, dims, rows),
            Op::Attention(l) if self.capture.borrow().is_some() => {
                if let Some(c) = self.capture.borrow_mut().as_mut() {
                    c.record(l, b.host_view(&w.qkv, kv, l), p.meta, &rows);
                }
                b.attention(step, &w.qkv, kv, l, dims, &mut w.attn, rows)
            }
            Op::Attention(l) => match p.selector.as_deref_mut() {
                Some(sel) if sel.on_device() => {
                    let entries = sel.device_entries(p.meta, &rows);
                    b.tactic_attention(step, &w.qkv, kv, l, dims, &entries, &mut w.attn, rows)
                }
                Some(sel) => {
                    let chosen = sel.select(l, b.host_view(&w.qkv, kv, l), p.meta, &rows)?;
                    b.sparse_attention(step, &w.qkv, kv, l, dims, chosen, &mut w.attn, rows)
                }
                None => b.attention(step, &w.qkv, kv, l, dims, &mut w.attn, rows),
            },
            Op::OProj(l) => b.linear(&w.attn, &layer(l).o, &mut w.proj, rows),
            Op::AddAttn(_) | Op::AddMlp(_) => b.add(&mut w.x, &w.proj, rows),
            Op::MlpNorm(l) => b.rmsnorm(&w.x, &layer(l).mlp_norm, c.rms_norm_eps, &mut w.h, rows),
            Op::GateUp(l) => b.linear(&w.h, &layer(l).gate_up, &mut w.gate_up, rows),
            Op::SiluMul(_) if self.fusions.silu_gemm_input => {
                b.silu_mul_gemm_input(&w.gate_up, &mut w.act, rows)
            }
            Op::SiluMul(_) => b.silu_mul(&w.gate_up, &mut w.act, rows),
            Op::AddAttnNorm(l) => {
                let norm = &layer(l).mlp_norm;
                b.add_rmsnorm(&mut w.x, &w.proj, norm, c.rms_norm_eps, &mut w.h, rows)
            }
            Op::AddMlpNorm(l) => {
                let norm = &layer(l + 1).attn_norm;
                b.add_rmsnorm(&mut w.x, &w.proj, norm, c.rms_norm_eps, &mut w.h, rows)
            }
            Op::RopeAppend(l) => {
                b.rope_kv_append(step, &mut w.qkv, &self.inv_freq, kv, l, dims, rows)
            }
            Op::Down(l) => b.linear(&w.act, &layer(l).down, &mut w.proj, rows),
            Op::Gather => b.gather_rows(step, &w.x, &mut w.sel, rows),
            Op::FinalNorm => b.rmsnorm(
                &w.sel,
                &self.final_norm,
                c.rms_norm_eps,
                &mut w.normed,
                rows,
            ),
            Op::LmHead => {
                let head = self.lm_head.as_ref().unwrap_or(&self.embed);
                b.linear(&w.normed, head, &mut w.logits, rows)
            }
        }
    }
}

#[cfg(test)]
mod graph_tests;
