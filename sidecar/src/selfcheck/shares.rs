//! Lanes held to SM shares: the two-lane mixed step of [`super::lanes`]
//! with each lane held to half the SMs by each mechanism of `--sm-share`
//! (`tacflow_kernels::cuda::share`), against the same step run
//! sequentially and on the CPU. A held lane must compute what an unheld
//! one does (other splits and GEMM kernels sum in another order, within
//! the lanes' tolerance); a mechanism the driver refuses fails its row
//! with the driver's reason.

use super::lanes::{CUTS, model_case};
use super::report::Row;
use super::{Ctx, case};
use crate::config::SmShare;
use crate::tune::gpu::hold_lanes;

/// The mechanisms checked: NanoFlow's pair, each alone, green.
const MECHANISMS: [&[SmShare]; 4] = [
    &[SmShare::Grid, SmShare::Cublas],
    &[SmShare::Grid],
    &[SmShare::Cublas],
    &[SmShare::Green],
];

/// The self-check group `shares` (a backend of two lanes).
pub fn shares(cx: &mut Ctx) -> Vec<Row> {
    let mut rows = vec![];
    for mechs in MECHANISMS {
        for (cut_name, cut) in CUTS {
            let name = format!(
                "{}, lanes at half the SMs: {cut_name}",
                SmShare::describe(mechs)
            );
            case(&mut rows, "shares", name, || {
                let given = hold_lanes(&mut cx.b, mechs, &[0.5, 0.5])?;
                let row = model_case(cx, cut);
                // Every lane back to the whole device, whatever the case gave.
                hold_lanes(&mut cx.b, mechs, &[])?;
                let row = row?;
                let note = format!("{}; SMs per lane {given:?}", row.note);
                Ok(row.with_note(note))
            });
        }
    }
    rows
}
