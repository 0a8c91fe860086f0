//! NVRTC: the modules compiled for the device's architecture at start-up,
//! with an on-disk PTX cache keyed by the source's hash, the architecture,
//! the options and the NVRTC version (a changed kernel or compiler is never
//! served stale PTX).

use super::probe::{Library, require};
use super::sources::Module;
use crate::error::{Error, Result};
use cudarc::nvrtc::{result, sys};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use tracing::{debug, warn};

/// Options of every compile: `-lineinfo` keeps source lines for
/// compute-sanitizer and profilers at no run-time cost.
pub const OPTIONS: [&str; 2] = ["--std=c++17", "-lineinfo"];

fn nvrtc_err(op: &'static str) -> impl Fn(result::NvrtcError) -> Error {
    move |e| Error::Nvrtc {
        op,
        msg: e.to_string(),
    }
}

/// NVRTC's `(major, minor)`.
pub fn version() -> Result<(i32, i32)> {
    require(&[Library::Nvrtc])?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers; the library is present (checked).
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(nvrtc_err("nvrtcVersion"))?;
    Ok((major, minor))
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn c_text(raw: Vec<std::ffi::c_char>) -> String {
    let bytes: Vec<u8> = raw
        .into_iter()
        .map(|c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs NVRTC on `module` with the common options plus `extra`; returns
/// the program and its log.
fn run(module: &Module, arch: &str, extra: &[&str]) -> Result<(Program, String)> {
    require(&[Library::Nvrtc])?;
    let src = CString::new(module.full_source()).map_err(|_| Error::Compile {
        module: module.name.into(),
        arch: arch.into(),
        log: "the source contains a NUL byte".into(),
    })?;
    let name = CString::new(format!("{}.cu", module.name)).unwrap_or_default();
    let prog = Program(
        result::create_program(&src, Some(&name)).map_err(nvrtc_err("nvrtcCreateProgram"))?,
    );
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.push(format!("--gpu-architecture={arch}"));
    opts.extend(extra.iter().map(|s| s.to_string()));
    // SAFETY: `prog` is a live program; the options are plain strings.
    let compiled = unsafe { result::compile_program(prog.0, &opts) };
    // SAFETY: as above; the log exists after a compile, failed or not.
    let log = unsafe { result::get_program_log(prog.0) }
        .map(c_text)
        .unwrap_or_default();
    match compiled {
        Ok(()) => Ok((prog, log)),
        Err(e) => Err(Error::Compile {
            module: module.name.into(),
            arch: arch.into(),
            log: format!("{e}\n{log}"),
        }),
    }
}

/// Compiles `module` to PTX for `arch` (`compute_90`).
pub fn compile(module: &Module, arch: &str) -> Result<String> {
    let (prog, log) = run(module, arch, &[])?;
    if !log.trim().is_empty() {
        debug!(module = module.name, log = %log.trim(), "NVRTC messages");
    }
    // SAFETY: the program compiled successfully.
    let ptx = unsafe { result::get_ptx(prog.0) }.map_err(nvrtc_err("nvrtcGetPTX"))?;
    Ok(c_text(ptx))
}

/// ptxas's resource report (registers, shared memory, spills) of every
/// kernel of `module` for a real architecture (`sm_90`).
pub fn resource_report(module: &Module, sm: &str) -> Result<String> {
    Ok(run(module, sm, &["--ptxas-options=-v"])?.1)
}

/// Where compiled PTX is kept: `$TACFLOW_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/tacflow/kernels`, else `~/.cache/tacflow/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("TACFLOW_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("tacflow").join("kernels"))
}

/// The cache file of `module` for `arch` under this NVRTC.
pub fn cache_path(dir: &Path, module: &Module, arch: &str, nvrtc: (i32, i32)) -> PathBuf {
    let mut h = Sha256::new();
    h.update(module.full_source().as_bytes());
    h.update(OPTIONS.join(" ").as_bytes());
    h.update(format!("{arch} nvrtc {}.{}", nvrtc.0, nvrtc.1).as_bytes());
    let hex: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    dir.join(format!("{}-{arch}-{hex}.ptx", module.name))
}

/// PTX of `module` for `arch`, from the cache when present; a fresh compile
/// is written back (a cache that cannot be written is only a warning).
pub fn compile_cached(module: &Module, arch: &str, dir: Option<&Path>) -> Result<String> {
    let Some(dir) = dir else {
        return compile(module, arch);
    };
    let path = cache_path(dir, module, arch, version()?);
    if let Ok(ptx) = std::fs::read_to_string(&path)
        && ptx.contains(".entry")
    {
        debug!(path = %path.display(), "PTX from the cache");
        return Ok(ptx);
    }
    let ptx = compile(module, arch)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&tmp, &ptx))
        .and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        warn!(path = %path.display(), cause = %e, "cannot cache compiled PTX");
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(ptx)
}

/// Names of the kernels a PTX module defines.
pub fn entry_names(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix(".visible .entry ")?;
            Some(rest.split('(').next()?.trim().to_owned())
        })
        .collect()
}

/// Compiles every module for `arch`, in parallel (NVRTC is thread-safe
/// across programs); results in module order.
pub fn compile_all(
    modules: &[Module],
    arch: &str,
    dir: Option<&Path>,
) -> Vec<(Module, Result<String>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = modules
            .iter()
            .map(|m| (*m, s.spawn(move || compile_cached(m, arch, dir))))
            .collect();
        handles
            .into_iter()
            .map(|(m, h)| {
                let r = h.join().unwrap_or_else(|_| {
                    Err(Error::Nvrtc {
                        op: "compile thread",
                        msg: format!("compiling {} panicked", m.name),
                    })
                });
                (m, r)
            })
            .collect()
    })
}
