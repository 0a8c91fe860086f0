//! `tacflowd`: the daemon's command line is `tacflow_sidecar::cli`.

fn main() -> anyhow::Result<()> {
    tacflow_sidecar::cli::main()
}
