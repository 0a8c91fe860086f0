//! Every CUDA kernel compiles through NVRTC for the H100 (sm_90), with no
//! GPU or driver: CI runs this with the pinned NVRTC wheel
//! (`source scripts/ci/nvrtc-env VENV`). Without libnvrtc it FAILS, never
//! passes silently.

use tacflow_kernels::cuda::nvrtc::{compile, entry_names, resource_report, version};
use tacflow_kernels::cuda::sources::{MODULES, kernel_names};

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
    for m in MODULES {
        match compile(&m, "compute_90") {
            Ok(ptx) => {
                let entries = entry_names(&ptx);
                for want in kernel_names(m.name) {
                    if !entries.contains(&want) {
                        failures.push(format!("{}: kernel {want} is missing from the PTX", m.name));
                    }
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

#[test]
fn no_kernel_spills_registers_on_sm90() {
    require_nvrtc();
    let mut spills = vec![];
    for m in MODULES {
        let report = resource_report(&m, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        let mut kernel = String::new();
        for line in report.lines() {
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                kernel = rest.split('\'').next().unwrap_or("").to_owned();
            }
            if line.contains("spill")
                && !line.contains(" 0 bytes spill stores, 0 bytes spill loads")
            {
                spills.push(format!("{kernel}: {}", line.trim()));
            }
        }
    }
    assert!(spills.is_empty(), "register spills:\n{}", spills.join("\n"));
}

/// ptxas's report of the attention kernels (registers, shared memory,
/// spills): `cargo test --release -p tacflow-kernels --test nvrtc_compile
/// attention_resources -- --nocapture` prints it (kernels/ATTENTION.md).
#[test]
fn attention_resources() {
    require_nvrtc();
    for m in MODULES.iter().filter(|m| m.name.starts_with("attention")) {
        let report = resource_report(m, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        let mut kernel = String::new();
        for line in report.lines() {
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                kernel = rest.split('\'').next().unwrap_or("").to_owned();
            } else if (line.contains("Used") || line.contains("spill")) && kernel.contains("128_g4")
                || kernel.contains("_g8_mma")
            {
                println!("{kernel}: {}", line.trim());
            }
        }
    }
}
