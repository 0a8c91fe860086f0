//! `tacflowd` with fault injection, for tests only: built with the
//! `fault-injection` feature, never installed. `TACFLOW_INJECT_FAULT` says
//! which fault to inject where (`backend::faults`).

fn main() -> anyhow::Result<()> {
    tacflow_sidecar::cli::main()
}
