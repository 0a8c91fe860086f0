//! Every CUDA kernel, the daemon's and the lab's, compiles through NVRTC
//! for Hopper (sm_90) with no GPU or driver: CI runs this with the pinned
//! NVRTC wheel (`source scripts/ci/nvrtc-env VENV`). Without libnvrtc it
//! FAILS, never passes silently. The fault-injection kernel exists only
//! with its feature, and is compiled here when that is on:
//! `cargo test --release -p tacflow-kernels --features fault-injection --test nvrtc_compile`.

use tacflow_kernels::cuda::nvrtc::{compile, entry_names, resource_report, version};
use tacflow_kernels::cuda::sources::{LAB_MODULES, MODULES, Module, kernel_names};

fn all_modules() -> impl Iterator<Item = (Module, bool)> {
    #[cfg(feature = "fault-injection")]
    let fault = tacflow_kernels::cuda::sources::FAULT_MODULES;
    #[cfg(not(feature = "fault-injection"))]
    let fault: [Module; 0] = [];
    MODULES
        .into_iter()
        .map(|m| (m, false))
        .chain(LAB_MODULES.into_iter().map(|m| (m, true)))
        .chain(fault.into_iter().map(|m| (m, true)))
}

fn require_nvrtc() {
    if let Err(e) = version() {
        panic!(
            "libnvrtc cannot be loaded, so the CUDA kernels were NOT compiled: {e}\n\
             Install the pinned wheel and export its path: `source scripts/ci/nvrtc-env .venv`"
        );
    }
}

#[test]
fn every_module_compiles_to_ptx_for_sm90_with_every_kernel() {
    require_nvrtc();
    let mut failures = vec![];
    for (m, _) in all_modules() {
        match compile(&m, "compute_90") {
            Ok(ptx) => {
                let entries = entry_names(&ptx);
                let wanted = kernel_names(m.name);
                for want in &wanted {
                    if !entries.contains(want) {
                        failures.push(format!("{}: kernel {want} is missing from the PTX", m.name));
                    }
                }
                // The daemon compiles and loads only what it dispatches: a
                // kernel no wrapper calls belongs in a lab module.
                for extra in entries.iter().filter(|e| !wanted.contains(e)) {
                    failures.push(format!(
                        "{}: kernel {extra} is compiled but never called",
                        m.name
                    ));
                }
                // CUDA 13.0 emits PTX ISA 9.0; the GPU machine's 13.0 driver
                // rejects newer PTX, so a newer NVRTC must not be used.
                let isa = ptx
                    .lines()
                    .find_map(|l| l.trim().strip_prefix(".version "))
                    .unwrap_or("?");
                if isa != "9.0" {
                    failures.push(format!(
                        "{}: PTX ISA {isa}, not 9.0: pin nvidia-cuda-nvrtc==13.0.88",
                        m.name
                    ));
                }
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// No kernel spills, and ptxas reported on every kernel (a kernel missing
/// from the report would pass the spill check unseen). With `--nocapture`
/// it prints the attention kernels' registers and shared memory
/// (kernels/ATTENTION.md quotes them):
/// `cargo test --release -p tacflow-kernels --test nvrtc_compile spills -- --nocapture`.
#[test]
fn no_kernel_spills_registers_on_sm90() {
    require_nvrtc();
    let mut spills = vec![];
    for (m, _) in all_modules() {
        let report = resource_report(&m, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        let mut kernel = String::new();
        let mut reported = vec![];
        for line in report.lines() {
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                kernel = rest.split('\'').next().unwrap_or("").to_owned();
                reported.push(kernel.clone());
            }
            if line.contains("spill")
                && !line.contains(" 0 bytes spill stores, 0 bytes spill loads")
            {
                spills.push(format!("{kernel}: {}", line.trim()));
            }
            if (m.name.starts_with("attention")
                || ["fused", "tactic"].contains(&m.name)
                || m.name.starts_with("prefill"))
                && line.contains("Used")
            {
                println!("{kernel}: {}", line.trim());
            }
        }
        for want in kernel_names(m.name) {
            if !reported.contains(&want) {
                spills.push(format!("{want}: no ptxas report"));
            }
        }
    }
    assert!(spills.is_empty(), "register spills:\n{}", spills.join("\n"));
}
