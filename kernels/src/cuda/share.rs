//! Holding a lane to a share of the SMs, so that two lanes' kernels run
//! side by side instead of the first to launch taking the whole GPU.
//! Three mechanisms, each an option, because which one works is a
//! measurement (docs/SCHEDULES.md):
//!
//! | mechanism | what it bounds | how |
//! | --- | --- | --- |
//! | [`SmMechanism::Grid`] | our decode attention | the CTA slots its plan fills ([`capped_slots`]) |
//! | [`SmMechanism::Cublas`] | the GEMMs | `cublasSetSmCountTarget` on the lane's handle |
//! | [`SmMechanism::Green`] | everything on the lane | its stream lives in a green context of N SMs (`green.rs`) |
//!
//! None is set unless asked: a lane without a limit runs exactly the
//! launches of a build without this file.

use super::device::{Gpu, attention_occupancy, drv, load_kernels};
use super::green::{self, GreenCtx};
use super::lane::Lane;
use super::sources::{MODULES, attention_kernels};
use crate::error::{Error, Result};
use cudarc::cublas::sys as blas;
use cudarc::driver::{CudaContext, CudaFunction, sys};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// A way to hold a lane to some of the SMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SmMechanism {
    /// Our attention's plan fills at most the lane's SMs' CTA slots. It
    /// bounds the grid where the plan is one wave; a launch of more CTAs
    /// than that (many rows, or a long context's several waves) still
    /// spreads over the device, because the kernel is not persistent.
    Grid,
    /// cuBLAS picks its GEMM kernels and grids for the lane's SM count.
    Cublas,
    /// The lane's stream lives in a green context of that many SMs.
    Green,
}

impl SmMechanism {
    pub const ALL: [SmMechanism; 3] = [SmMechanism::Grid, SmMechanism::Cublas, SmMechanism::Green];

    pub fn name(self) -> &'static str {
        match self {
            SmMechanism::Grid => "grid",
            SmMechanism::Cublas => "cublas",
            SmMechanism::Green => "green",
        }
    }
}

impl std::str::FromStr for SmMechanism {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<SmMechanism, String> {
        SmMechanism::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("SM-share mechanism `{s}`: one of grid, cublas, green"))
    }
}

/// The CTA slots of a plan on a lane held to `cap` SMs of `sm_count`
/// (`slots` is the whole GPU's: `sm_count` x CTAs per SM); `cap` 0 or at
/// least `sm_count` leaves `slots` as they are.
pub fn capped_slots(slots: usize, sm_count: usize, cap: usize) -> usize {
    if cap == 0 || cap >= sm_count {
        return slots;
    }
    (slots / sm_count.max(1) * cap).max(1)
}

/// The first cuBLAS with `cublasSetSmCountTarget` (11.3), as
/// `cublasGetVersion` spells it before 12 (major x 1000 + minor x 100 +
/// patch; from 12 on major x 10000 ..., larger still).
const BLAS_SM_TARGET: i32 = 11_300;

impl Gpu {
    /// Holds `lane` to `sms` SMs by `mech` (`None`: lifts the limit);
    /// returns the SMs it runs on now. A mechanism the driver or cuBLAS
    /// lacks is an error, never another mechanism.
    pub fn limit_lane(
        &mut self,
        lane: usize,
        mech: SmMechanism,
        sms: Option<usize>,
    ) -> Result<usize> {
        let all = self.info().sm_count;
        let l = self
            .lanes
            .all
            .get(lane)
            .ok_or_else(|| Error::Shape(format!("lane {lane} of {}", self.lanes.all.len())))?;
        let sms = sms.filter(|&n| n < all);
        if sms == Some(0) {
            return Err(Error::Shape("a lane needs at least one SM".into()));
        }
        match mech {
            SmMechanism::Grid => {
                l.attn_sms.store(sms.unwrap_or(0), Ordering::Relaxed);
                Ok(sms.unwrap_or(all))
            }
            SmMechanism::Cublas => {
                set_blas_sm_target(l, sms.unwrap_or(0))?;
                Ok(sms.unwrap_or(all))
            }
            SmMechanism::Green => self.green_lane(lane, sms),
        }
    }

    /// SMs the current lane's attention plan may fill (0: all).
    pub fn lane_attention_sms(&self) -> usize {
        self.lanes.now().attn_sms.load(Ordering::Relaxed)
    }

    /// Rebuilds `lane` on a stream of a green context of `sms` SMs (or of
    /// the device's own context with `None`), after every lane's work.
    fn green_lane(&mut self, lane: usize, sms: Option<usize>) -> Result<usize> {
        let group = match sms {
            None => None,
            Some(n) => Some(green::carve(&green::device_sms(&self.context())?, n)?.0),
        };
        self.rebuild_lane(lane, group)
    }

    /// Puts lane `i` in a green context of `sms[i]` SMs (all of the
    /// device's for `None`), the groups carved one after another from what
    /// the previous left, so that no two lanes share an SM. Returns the
    /// SMs each lane was given.
    pub fn green_lanes(&mut self, sms: &[Option<usize>]) -> Result<Vec<usize>> {
        let all = self.info().sm_count;
        let mut left = green::device_sms(&self.context())?;
        let mut given = vec![];
        for (lane, n) in sms.iter().enumerate() {
            let group = match n.filter(|&n| n < all) {
                None => None,
                Some(n) => {
                    let (group, rest) = green::carve(&left, n)?;
                    left = rest;
                    Some(group)
                }
            };
            given.push(self.rebuild_lane(lane, group)?);
        }
        Ok(given)
    }

    /// Replaces `lane` by a fresh one, in a green context of `group` or in
    /// the device's context; waits for every lane first.
    fn rebuild_lane(&mut self, lane: usize, group: Option<sys::CUdevResource>) -> Result<usize> {
        self.synchronize()?;
        let dev = self.context();
        let new = match group {
            None => {
                let stream = dev.new_stream().map_err(drv("cuStreamCreate"))?;
                Lane::on(stream, None, None)?
            }
            Some(group) => {
                let green = GreenCtx::new(&dev, group)?;
                let made = green
                    .ctx
                    .new_stream()
                    .map_err(drv("cuStreamCreate (green context)"))
                    .and_then(|stream| {
                        let funcs = self.kernels_in(&green.ctx)?;
                        Ok((stream, funcs))
                    });
                let r = made.and_then(|(stream, funcs)| Lane::on(stream, Some(funcs), Some(green)));
                dev.bind_to_thread().map_err(drv("cuCtxSetCurrent"))?;
                r?
            }
        };
        let given = new.green.as_ref().map_or(self.info().sm_count, |g| g.sms);
        self.lanes.all[lane] = new;
        Ok(given)
    }
}

impl Gpu {
    /// The daemon's kernels loaded again in `ctx` (a green context's lane:
    /// functions belong to the context that loaded their module), their
    /// attention, prefill and rank kernels readied as in the device's own.
    fn kernels_in(&self, ctx: &Arc<CudaContext>) -> Result<HashMap<String, CudaFunction>> {
        let funcs = load_kernels(ctx, &self.info().arch, &MODULES)?;
        attention_occupancy(&funcs, &attention_kernels())?;
        super::prefill::prefill_occupancy(&funcs)?;
        super::tactic::rank_shared_memory(&funcs)?;
        Ok(funcs)
    }
}

/// `cublasSetSmCountTarget(n)` on `lane`'s handle (0: no target).
fn set_blas_sm_target(lane: &Lane, n: usize) -> Result<()> {
    let handle = *lane.blas.handle();
    let mut version = 0;
    // SAFETY: the handle is live (the lane owns it); writes one int.
    let s = unsafe { blas::cublasGetVersion_v2(handle, &mut version) };
    if s != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Err(Error::Cublas {
            op: "cublasGetVersion",
            msg: format!("{s:?}"),
        });
    }
    if version < BLAS_SM_TARGET {
        return Err(Error::Unsupported(format!(
            "cublasSetSmCountTarget needs cuBLAS 11.3 or later; this one is {version}"
        )));
    }
    let n = i32::try_from(n).map_err(|_| Error::Shape(format!("{n} SMs")))?;
    // SAFETY: the handle is live and only this lane's stream uses it; the
    // symbol exists from cuBLAS 11.3 on (checked above).
    let s = unsafe { blas::cublasSetSmCountTarget(handle, n) };
    match s {
        blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        s => Err(Error::Cublas {
            op: "cublasSetSmCountTarget",
            msg: format!("{s:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_bounds_the_slots_and_no_cap_keeps_them() {
        let (sms, per_sm) = (132, 4);
        let all = sms * per_sm;
        assert_eq!(capped_slots(all, sms, 0), all, "no cap");
        assert_eq!(capped_slots(all, sms, sms), all, "a cap of every SM");
        assert_eq!(capped_slots(all, sms, 500), all, "more than the device");
        assert_eq!(capped_slots(all, sms, 33), 33 * per_sm);
        assert_eq!(capped_slots(all, sms, 1), per_sm);
        assert_eq!(capped_slots(1, sms, 1), 1, "never below one slot");
    }

    #[test]
    fn mechanisms_parse_by_name() {
        for m in SmMechanism::ALL {
            assert_eq!(m.name().parse::<SmMechanism>(), Ok(m));
        }
        assert!("mps".parse::<SmMechanism>().is_err());
    }
}
