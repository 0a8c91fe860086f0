// Shared by the examples that run CUDA kernels on the CPU stand-in
// (kernels/examples/*_emu, included with `#[path]`): the kernels' source
// made ready for it, and the compile.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `source` with each `extern __shared__ TYPE NAME[];` (dynamic shared
/// memory) rewritten into a pointer to the stand-in block's buffer.
pub fn rewrite_shared(source: &str) -> String {
    source
        .lines()
        .map(|l| match dynamic_shared(l) {
            Some((ty, name)) => format!("{ty}* {name} = ({ty}*)emu_blk->dyn.data();\n"),
            None => format!("{l}\n"),
        })
        .collect()
}

/// `(type, name)` of a line `extern __shared__ TYPE NAME[];` (a comment
/// may follow).
fn dynamic_shared(line: &str) -> Option<(&str, &str)> {
    let code = line.split("//").next()?.trim();
    let decl = code
        .strip_prefix("extern __shared__ ")?
        .strip_suffix("[];")?;
    decl.split_once(' ')
}

/// Writes `files` (name, text) into `dir` and compiles `main` among them
/// into `dir/exe` with `$CXX` (else `g++`), C++20, no contraction of
/// floating-point operations (the kernels' `_rn` intrinsics are plain
/// operations there).
pub fn compile(dir: &Path, files: &[(&str, &str)], main: &str, exe: &str) -> Result<PathBuf> {
    for (name, text) in files {
        std::fs::write(dir.join(name), text)?;
    }
    let out = dir.join(exe);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let status = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-ffp-contract=off", "-pthread", "-o"])
        .arg(&out)
        .arg(dir.join(main))
        .status()
        .with_context(|| format!("running {cxx}"))?;
    if !status.success() {
        bail!("{cxx} failed to compile the kernels on the stand-in");
    }
    Ok(out)
}
