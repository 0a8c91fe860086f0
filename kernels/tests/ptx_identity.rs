//! The PTX of every product kernel is pinned: each kernel's entry function,
//! compiled by NVRTC for `compute_90`, is hashed and compared with
//! `kernels/ptx-identity.tsv`. Moving a kernel between files, or changing
//! code no product kernel uses, leaves the table as it is; a change to what
//! a product kernel computes fails here.
//!
//! Each row is `kernel<TAB>hash<TAB>status`, the status saying what the
//! hash is:
//!
//! - `verified`: the PTX last run on a GPU (the self-check passed on it).
//!   The hash must match; it changes only by `verify` after a GPU run.
//! - `unverified`: a new kernel not yet run on a GPU. Its hash is recorded
//!   so that any change is seen; the test passes while it matches.
//!
//! Taking the table:
//!
//! ```sh
//! # adds new kernels as unverified and retakes unverified rows; never
//! # touches a verified row (a changed verified kernel still fails)
//! TACFLOW_PTX_TABLE=write cargo test --release -p tacflow-kernels --test ptx_identity
//! # after a GPU run whose self-check log is committed: every row of the
//! # current code becomes verified
//! TACFLOW_PTX_TABLE=verify cargo test --release -p tacflow-kernels --test ptx_identity
//! ```
//!
//! A two-column row (the old format) reads as `verified`.
//!
//! The hash covers the entry's text from `.entry` to its closing brace,
//! with what depends only on where the code sits taken out: `.loc` line
//! records, and the function's index in its module inside the names of
//! labels and stack depots. Like every NVRTC test it FAILS without
//! libnvrtc (`source scripts/ci/nvrtc-env VENV`).

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tacflow_kernels::cuda::nvrtc::{compile, version};
use tacflow_kernels::cuda::sources::{LAB_MODULES, MODULES, kernel_names};

fn table_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ptx-identity.tsv")
}

/// `$L__BB12_3` -> `$L__BB_3`, `__local_depot12` -> `__local_depot`: the
/// number after the prefix is the function's index in the module.
fn strip_index(line: &str, prefix: &str, keep_tail: bool) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find(prefix) {
        out.push_str(&rest[..i + prefix.len()]);
        rest = &rest[i + prefix.len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        rest = &rest[digits..];
        if keep_tail {
            // `_<block>` follows the index of a label.
            continue;
        }
    }
    out.push_str(rest);
    out
}

/// The name a `.shared` declaration declares (the word before `;` or `[`).
fn shared_name(decl: &str) -> &str {
    let head = decl.split(['[', ';']).next().unwrap_or("");
    head.split_whitespace().last().unwrap_or("")
}

/// Each entry function of a PTX module, normalised, by name. A `.shared`
/// variable used by one entry is declared inside it ("demoted"), one used
/// by several at module scope: either way the declarations an entry uses
/// head its text, sorted, so that which other kernels share its module
/// does not matter.
fn entries(ptx: &str) -> BTreeMap<String, String> {
    let module_shared: Vec<String> = ptx
        .lines()
        .take_while(|l| !l.trim_start().starts_with(".visible .entry "))
        .chain(
            ptx.lines()
                .filter(|l| !l.starts_with('\t') && !l.starts_with(' ')),
        )
        .map(str::trim)
        .filter(|l| l.starts_with(".shared ") || l.starts_with(".extern .shared "))
        .map(str::to_owned)
        .collect();
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String, Vec<String>)> = None;
    for line in ptx.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix(".visible .entry ") {
            let name = rest.split('(').next().unwrap_or("").trim().to_owned();
            current = Some((name, String::new(), vec![]));
        }
        let Some((_, body, shared)) = current.as_mut() else {
            continue;
        };
        if t.starts_with(".loc")
            || t.starts_with("$L__tmp")
            || t.is_empty()
            || t == "// demoted variable"
        {
            continue;
        }
        if t.starts_with(".shared ") {
            shared.push(t.to_owned());
            continue;
        }
        let l = strip_index(line, "$L__BB", true);
        let l = strip_index(&l, "__local_depot", false);
        body.push_str(&l);
        body.push('\n');
        if line.starts_with('}') {
            let (name, body, mut shared) = current.take().expect("inside an entry");
            shared.extend(
                module_shared
                    .iter()
                    .filter(|d| body.contains(shared_name(d)))
                    .cloned(),
            );
            shared.sort();
            shared.dedup();
            out.insert(name, format!("{}\n{body}", shared.join("\n")));
        }
    }
    out
}

fn hash(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every kernel the modules define, hashed, by name.
fn current_hashes() -> BTreeMap<String, String> {
    if let Err(e) = version() {
        panic!(
            "libnvrtc cannot be loaded, so the kernels' PTX was NOT checked: {e}\n\
             `source scripts/ci/nvrtc-env .venv` installs and exports it"
        );
    }
    let mut out = BTreeMap::new();
    for m in MODULES.iter().chain(&LAB_MODULES) {
        let ptx = compile(m, "compute_90").unwrap_or_else(|e| panic!("{e}"));
        for (name, body) in entries(&ptx) {
            assert!(
                out.insert(name.clone(), hash(&body)).is_none(),
                "kernel {name} is defined by two modules"
            );
        }
    }
    out
}

/// Writes each kernel's normalised PTX to `dir/<kernel>.ptx`, to see what
/// changed (`TACFLOW_PTX_DUMP=DIR`).
fn dump(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("create the dump folder");
    for m in MODULES.iter().chain(&LAB_MODULES) {
        let ptx = compile(m, "compute_90").unwrap_or_else(|e| panic!("{e}"));
        for (name, body) in entries(&ptx) {
            std::fs::write(dir.join(format!("{name}.ptx")), body).expect("write");
        }
    }
}

/// Whether a row's hash was run on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Verified,
    Unverified,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Verified => "verified",
            Status::Unverified => "unverified",
        }
    }
}

type Table = BTreeMap<String, (String, Status)>;

const HEADER: &str = "# kernel<TAB>sha256 of its normalised PTX (compute_90, NVRTC 13.0)<TAB>\
verified (last run on a GPU) or unverified (new, not yet run on one); \
kernels/tests/ptx_identity.rs says how it is taken\n";

fn parse_table(text: &str) -> Table {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut f = l.split('\t');
            let name = f.next().expect("a kernel name").to_owned();
            let h = f.next().expect("name<TAB>hash").to_owned();
            let status = match f.next() {
                None | Some("verified") => Status::Verified,
                Some("unverified") => Status::Unverified,
                Some(other) => panic!("{name}: status {other:?}, not verified/unverified"),
            };
            (name, (h, status))
        })
        .collect()
}

fn format_table(t: &Table) -> String {
    let mut text = String::from(HEADER);
    for (name, (h, s)) in t {
        text.push_str(&format!("{name}\t{h}\t{}\n", s.word()));
    }
    text
}

fn read_table() -> Table {
    let text = std::fs::read_to_string(table_path())
        .unwrap_or_else(|e| panic!("{}: {e}", table_path().display()));
    parse_table(&text)
}

/// `write`: new kernels enter as unverified, unverified rows take the
/// current hash, verified rows are kept as they are (a changed one keeps
/// failing). Rows of kernels that no longer exist are dropped.
fn write_rows(table: &Table, now: &BTreeMap<String, String>) -> Table {
    now.iter()
        .map(|(name, h)| {
            let row = match table.get(name) {
                Some((old, Status::Verified)) => (old.clone(), Status::Verified),
                _ => (h.clone(), Status::Unverified),
            };
            (name.clone(), row)
        })
        .collect()
}

/// `verify`: every kernel of the current code, as it is now, verified.
fn verify_rows(now: &BTreeMap<String, String>) -> Table {
    now.iter()
        .map(|(name, h)| (name.clone(), (h.clone(), Status::Verified)))
        .collect()
}

/// What is wrong with kernel `name` against the table, if anything.
fn check_row(name: &str, now: Option<&String>, row: Option<&(String, Status)>) -> Option<String> {
    match (now, row) {
        (Some(h), Some((want, _))) if h == want => None,
        (Some(_), Some((_, Status::Verified))) => Some(format!(
            "{name}: its PTX changed from the code last run on a GPU"
        )),
        (Some(_), Some((_, Status::Unverified))) => Some(format!(
            "{name}: its PTX changed (unverified: retake with TACFLOW_PTX_TABLE=write)"
        )),
        (None, _) => Some(format!("{name}: not compiled")),
        (Some(_), None) => Some(format!(
            "{name}: not in the table (add it with TACFLOW_PTX_TABLE=write)"
        )),
    }
}

#[test]
fn product_kernels_compile_to_the_ptx_last_run_on_a_gpu() {
    let now = current_hashes();
    if let Some(dir) = std::env::var_os("TACFLOW_PTX_DUMP") {
        dump(std::path::Path::new(&dir));
    }
    let mode = std::env::var("TACFLOW_PTX_TABLE").unwrap_or_default();
    let table = read_table();
    let new_table = match mode.as_str() {
        "write" => Some(write_rows(&table, &now)),
        "verify" => Some(verify_rows(&now)),
        "" => None,
        other => panic!("TACFLOW_PTX_TABLE={other}: expected write or verify"),
    };
    let table = match new_table {
        Some(t) => {
            std::fs::write(table_path(), format_table(&t)).expect("write the table");
            t
        }
        None => table,
    };
    let mut failures = vec![];
    // The lab's kernels too: they were moved, not changed.
    for m in MODULES.iter().chain(&LAB_MODULES) {
        for name in kernel_names(m.name) {
            failures.extend(check_row(&name, now.get(&name), table.get(&name)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} product kernels differ from the table:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_table_keeps_verified_rows_and_tracks_unverified_ones() {
    let t = parse_table(&format!(
        "{HEADER}a\th1\nb\th2\tverified\nc\th3\tunverified\ngone\th9\tunverified\n"
    ));
    assert_eq!(
        t["a"],
        ("h1".into(), Status::Verified),
        "old two-column row"
    );
    assert_eq!(parse_table(&format_table(&t)), t, "round trip");
    let now: BTreeMap<String, String> = [("a", "h1x"), ("b", "h2"), ("c", "h3x"), ("d", "h4")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let w = write_rows(&t, &now);
    assert_eq!(w["a"], ("h1".into(), Status::Verified), "verified row kept");
    assert_eq!(
        w["c"],
        ("h3x".into(), Status::Unverified),
        "unverified retaken"
    );
    assert_eq!(w["d"], ("h4".into(), Status::Unverified), "new row");
    assert!(!w.contains_key("gone"));
    assert!(
        check_row("a", now.get("a"), w.get("a")).is_some(),
        "still fails"
    );
    assert!(check_row("c", now.get("c"), w.get("c")).is_none());
    assert!(check_row("e", Some(&"h".into()), None).is_some());
    let v = verify_rows(&now);
    assert!(v.values().all(|(_, s)| *s == Status::Verified));
    assert_eq!(v["a"].0, "h1x");
}

#[test]
fn normalising_keeps_code_and_drops_positions() {
    let ptx = "\
.visible .entry k1(\n\
\t.param .u64 p\n\
)\n\
{\n\
\t.loc 1 10 3\n\
$L__BB3_2:\n\
\tld.u64 %rd1, [__local_depot3];\n\
\tbra.uni $L__BB3_2;\n\
}\n";
    let moved = ptx
        .replace("BB3_", "BB7_")
        .replace("depot3", "depot7")
        .replace("1 10 3", "2 99 1");
    let e = entries(ptx);
    assert_eq!(e.len(), 1);
    assert_eq!(e["k1"], entries(&moved)["k1"], "position only");
    let changed = ptx.replace("ld.u64", "ld.u32");
    assert_ne!(e["k1"], entries(&changed)["k1"], "code changed");
    let demoted = ptx.replace(
        "{\n",
        "{\n\t.shared .align 4 .u32 sm_x;\n\t// demoted variable\n",
    );
    let shared = format!(".shared .align 4 .u32 sm_x;\n{ptx}");
    let uses = |p: &str| p.replace("[__local_depot3]", "[sm_x]");
    assert_eq!(
        entries(&uses(&demoted))["k1"],
        entries(&uses(&shared))["k1"],
        "a shared variable declared in the entry or in the module"
    );
    assert_ne!(entries(&uses(&shared))["k1"], entries(&uses(ptx))["k1"]);
    let other_block = ptx.replace("BB3_2", "BB3_4");
    assert_ne!(e["k1"], entries(&other_block)["k1"], "block numbers kept");
}
