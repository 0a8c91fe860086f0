//! The laboratory beside the daemon's kernels (feature `lab`): loading the
//! benchmark-only modules ([`LAB_MODULES`]) into a [`Gpu`], and attention
//! launches with the kernel chosen by hand — a variant of the key loop, a
//! timeline variant, or the first attention kernel kept as the measured
//! baseline (`attention_regs`). `tacflowd bench-*` and the lab's
//! self-check cases use it; the daemon never does.

use super::attention::{AttnIo, AttnOverride, AttnPlan, AttnShape};
use super::device::Gpu;
use super::sources::{AttnVariant, LAB_MODULES, lab_attention_kernels};
use super::step::DeviceStep;
use crate::error::Result;

/// Which attention kernel a lab launch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKernel {
    /// A loop shape of the shared key loops (`AttnVariant`).
    Main(AttnVariant),
    /// The first attention kernel (loads into registers, a second launch
    /// merges the splits): the measured baseline, head size 128 and 4 heads
    /// per CTA only.
    First,
}

/// A lab launch: the plan's overrides, the kernel, and where a timeline
/// variant writes (`8 x CTAs` u64, `TL_*` in attention/common.cuh).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttnForce {
    pub plan: AttnOverride,
    pub kernel: Option<AttnKernel>,
    pub timeline: Option<u64>,
}

impl Gpu {
    /// Compiles (through the PTX cache) and loads the lab's modules, once.
    pub fn load_lab(&mut self) -> Result<()> {
        if self.has_kernel("read_ceiling") {
            return Ok(());
        }
        self.load_modules(&LAB_MODULES, &lab_attention_kernels())
    }

    /// The plan [`Gpu::attention_forced`] would use.
    pub fn attention_plan_forced(
        &self,
        shape: &AttnShape,
        rows: usize,
        max_kv_len: usize,
        force: AttnForce,
    ) -> AttnPlan {
        let v = match force.kernel {
            Some(AttnKernel::Main(v)) => v,
            _ => AttnVariant::default_for(shape.head_dim, shape.heads_per_cta()),
        };
        self.attention_plan_for(shape, rows, max_kv_len, v, force.plan)
    }

    /// [`Gpu::attention`] with the kernel chosen by `force` (the daemon's
    /// when `None`); needs [`Gpu::load_lab`] for any other kernel.
    pub fn attention_forced(
        &self,
        step: &DeviceStep,
        io: AttnIo<'_>,
        shape: AttnShape,
        force: AttnForce,
    ) -> Result<AttnPlan> {
        let rows = step.rows;
        let max_kv = step.max_kv_len as usize;
        let v = match force.kernel {
            None => AttnVariant::default_for(shape.head_dim, shape.heads_per_cta()),
            Some(AttnKernel::Main(v)) => v,
            Some(AttnKernel::First) => {
                let plan = self.attention_plan(&shape, rows, max_kv, force.plan);
                let AttnIo {
                    qkv,
                    kv,
                    layer,
                    out,
                } = io;
                let mut out = out;
                let (splits, pages_per_split) = self.attention_registers(
                    step,
                    (&qkv, kv, layer, &mut out),
                    &shape,
                    &plan,
                    force.plan.splits,
                )?;
                return Ok(AttnPlan {
                    splits,
                    pages_per_split,
                    long_splits: splits,
                    ..plan
                });
            }
        };
        let plan = self.attention_plan_for(&shape, rows, max_kv, v, force.plan);
        self.attention_launch(step, io, shape, plan, force.timeline.unwrap_or(0))
    }
}
