//! The CUDA sources, one `.cu` file per kernel family, embedded in the
//! binary. Each module is compiled as the shared prelude, its headers, then
//! its file, so no include path is ever needed.
//!
//! [`MODULES`] are the daemon's: it compiles and loads them at start-up,
//! and each defines exactly the kernels its launch wrappers call.
//! [`LAB_MODULES`] hold the benchmark-only kernels (variants, read-only
//! twins, timelines, the first attention kernel kept as a baseline, the
//! read ceiling, a stream hold): the NVRTC tests compile them in every
//! build so that they cannot rot, but only the lab's code (the `lab`
//! feature: `tacflowd bench-*`, the lab's self-check cases) loads them.
//! [`FAULT_MODULES`] exist only with the `fault-injection` feature (the
//! test daemon `tacflowd-faults`): a kernel that faults the context on
//! purpose, which no other build embeds.

/// Helpers every module starts with: bf16 bit conversions, reductions, the
/// counter-based generator (the twin of `crate::rng`).
pub const PRELUDE: &str = include_str!("kernels/prelude.cuh");

/// A file compiled before a module's own, under its own name in errors.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub name: &'static str,
    pub text: &'static str,
}

/// One compilation unit.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    pub name: &'static str,
    pub headers: &'static [Header],
    pub source: &'static str,
}

impl Module {
    /// The text NVRTC compiles: the prelude, the headers, then the file,
    /// each after a `#line` so that errors point into the right file.
    pub fn full_source(&self) -> String {
        let mut text = format!("{PRELUDE}\n");
        for h in self.headers {
            text.push_str(&format!("#line 1 \"{}\"\n{}\n", h.name, h.text));
        }
        text.push_str(&format!("#line 1 \"{}.cu\"\n{}", self.name, self.source));
        text
    }
}

/// What every attention module compiles first: the parameters, the split
/// plan and the merges, then the two key loops the daemon runs.
const ATTENTION_HEADERS: [Header; 3] = [
    Header {
        name: "attention/common.cuh",
        text: include_str!("kernels/attention/common.cuh"),
    },
    Header {
        name: "attention/simt.cuh",
        text: include_str!("kernels/attention/simt.cuh"),
    },
    Header {
        name: "attention/frag.cuh",
        text: include_str!("kernels/attention/frag.cuh"),
    },
];

/// What the Tactic module compiles first: the shared definitions, the
/// clustering, the selection, the union, the sparse attention, the
/// diagnostics, the two baselines (oracle, fixed budget).
const TACTIC_HEADERS: [Header; 8] = [
    Header {
        name: "tactic/common.cuh",
        text: include_str!("kernels/tactic/common.cuh"),
    },
    Header {
        name: "tactic/kmeans.cuh",
        text: include_str!("kernels/tactic/kmeans.cuh"),
    },
    Header {
        name: "tactic/select.cuh",
        text: include_str!("kernels/tactic/select.cuh"),
    },
    Header {
        name: "tactic/union.cuh",
        text: include_str!("kernels/tactic/union.cuh"),
    },
    Header {
        name: "tactic/sparse.cuh",
        text: include_str!("kernels/tactic/sparse.cuh"),
    },
    Header {
        name: "tactic/diag.cuh",
        text: include_str!("kernels/tactic/diag.cuh"),
    },
    Header {
        name: "tactic/oracle.cuh",
        text: include_str!("kernels/tactic/oracle.cuh"),
    },
    Header {
        name: "tactic/budget.cuh",
        text: include_str!("kernels/tactic/budget.cuh"),
    },
];

/// The prefill attention's tile loop, shared by the daemon's kernels and
/// the lab's variant.
const PREFILL_HEADERS: [Header; 1] = [Header {
    name: "prefill/tc.cuh",
    text: include_str!("kernels/prefill/tc.cuh"),
}];

const fn module(name: &'static str, source: &'static str) -> Module {
    Module {
        name,
        headers: &[],
        source,
    }
}

/// The daemon's modules.
pub const MODULES: [Module; 9] = [
    module("random", include_str!("kernels/random.cu")),
    module("rowwise", include_str!("kernels/rowwise.cu")),
    module("rope", include_str!("kernels/rope.cu")),
    module("kv", include_str!("kernels/kv.cu")),
    Module {
        name: "attention",
        headers: &ATTENTION_HEADERS,
        source: include_str!("kernels/attention.cu"),
    },
    module("sampling", include_str!("kernels/sampling.cu")),
    module("fused", include_str!("kernels/fused.cu")),
    Module {
        name: "tactic",
        headers: &TACTIC_HEADERS,
        source: include_str!("kernels/tactic.cu"),
    },
    Module {
        name: "prefill",
        headers: &PREFILL_HEADERS,
        source: include_str!("kernels/prefill.cu"),
    },
];

/// The benchmark-only modules (see the module doc).
pub const LAB_MODULES: [Module; 4] = [
    Module {
        name: "attention_variants",
        headers: &ATTENTION_HEADERS,
        source: include_str!("kernels/lab/attention_variants.cu"),
    },
    module(
        "attention_regs",
        include_str!("kernels/lab/attention_regs.cu"),
    ),
    module("bench", include_str!("kernels/lab/bench.cu")),
    Module {
        name: "prefill_variants",
        headers: &PREFILL_HEADERS,
        source: include_str!("kernels/lab/prefill_variants.cu"),
    },
];

/// The kernel that faults on purpose (`fault.rs`; feature
/// `fault-injection` only, so that a release daemon does not embed it).
#[cfg(feature = "fault-injection")]
pub const FAULT_MODULES: [Module; 1] = [module("fault", include_str!("kernels/fault.cu"))];

/// The Tactic module's kernels (`tactic.rs` launches each).
pub const TACTIC_KERNELS: [&str; 23] = [
    "tactic_km_init_bf16",
    "tactic_km_assign_bf16",
    "tactic_km_csr_u32",
    "tactic_km_update_bf16",
    "tactic_km_compact_u32",
    "tactic_km_stats_bf16",
    "tactic_km_shape_bf16",
    "tactic_km_shape_norm_f64",
    "tactic_sel_prep_bf16",
    "tactic_sel_score_f32",
    "tactic_sel_rank_u64",
    "tactic_sel_union_bf16",
    "tactic_attention_d32_bf16",
    "tactic_attention_d64_bf16",
    "tactic_attention_d128_bf16",
    "tactic_attention_d256_bf16",
    "tactic_attention_merge_f32",
    "tactic_diag_mass_bf16",
    "tactic_oracle_scores_bf16",
    "tactic_oracle_sort_u64",
    "tactic_oracle_take_f64",
    "tactic_budget_bounds_bf16",
    "tactic_budget_take_u32",
];

/// Head sizes the Tactic sparse attention is instantiated for.
pub const TACTIC_HEAD_DIMS: [usize; 4] = [32, 64, 128, 256];
/// Most query heads per KV head the Tactic kernels serve (`TAC_MAX_GROUP`).
pub const TACTIC_MAX_GROUP: usize = 8;

/// Head sizes and query heads per CTA that `attention.cu` instantiates.
pub const ATTENTION_HEAD_DIMS: [usize; 5] = [16, 32, 64, 128, 256];
pub const ATTENTION_MAX_GROUP: usize = 8;
/// Threads of an attention CTA (`ATT_THREADS`; the tensor-core loop on
/// fragments: `FRAG_THREADS`, [`AttnVariant::threads`]).
pub const ATTENTION_THREADS: usize = 128;
const ATTENTION_FRAG_THREADS: usize = 96;
/// Block-table pages one attention CTA stages (`MAX_SPLIT_PAGES`).
pub const ATTENTION_MAX_SPLIT_PAGES: usize = 1024;

/// How the attention kernel's key loop loads K and V (`LOAD_*` in
/// attention/common.cuh and attention/frag.cuh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnLoad {
    /// `cp.async` into a per-thread ring of `stages` stages in shared memory.
    Ring,
    /// 16-byte loads straight into registers, then the arithmetic.
    Direct,
    /// 16-byte loads into registers one stage ahead of the arithmetic.
    Prefetch,
    /// A warp per page, `cp.async` into a per-warp ring of `stages` stages,
    /// both products on tensor cores (mma.sync).
    Mma,
    /// A warp per page, each lane's 16-byte pieces of K and V loaded
    /// straight into the mma fragments' registers (no shared memory), both
    /// products on tensor cores.
    Frag,
}

/// The shape of the attention kernel's key loop: `keys` keys per row group
/// per stage (U), `stages` stages in the shared-memory ring (P, ring mode;
/// 1 otherwise); `compute: false` is the read-only twin (the loads and
/// nothing else: what the loop's loads alone reach, benchmarks only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnVariant {
    pub load: AttnLoad,
    pub keys: usize,
    pub stages: usize,
    pub compute: bool,
    /// Loads through `ld.global.nc.L1::no_allocate` (register modes).
    pub stream: bool,
    /// The lean loop: the scores summed by one reduce-scatter over the row
    /// group (when the keys x heads of a stage fit its lanes), the
    /// accumulator rescaled only when a head's max grows.
    pub lean: bool,
    /// Records a timeline of each CTA when given a buffer (benchmarks).
    pub timeline: bool,
}

impl AttnVariant {
    pub const fn ring(keys: usize, stages: usize) -> AttnVariant {
        AttnVariant {
            load: AttnLoad::Ring,
            keys,
            stages,
            compute: true,
            stream: false,
            lean: false,
            timeline: false,
        }
    }

    pub const fn registers(load: AttnLoad, keys: usize) -> AttnVariant {
        AttnVariant {
            load,
            keys,
            stages: 1,
            compute: true,
            stream: false,
            lean: false,
            timeline: false,
        }
    }

    pub const fn mma(stages: usize) -> AttnVariant {
        AttnVariant {
            load: AttnLoad::Mma,
            keys: 16,
            stages,
            compute: true,
            stream: false,
            lean: false,
            timeline: false,
        }
    }

    /// The tensor-core loop on register fragments (head size 128 with 1-8
    /// heads per CTA, or 64 with 5-8; `FRAG_THREADS` threads a CTA).
    pub const fn frag() -> AttnVariant {
        AttnVariant {
            load: AttnLoad::Frag,
            keys: 16,
            stages: 1,
            compute: true,
            stream: true,
            lean: false,
            timeline: false,
        }
    }

    pub const fn streaming(self) -> AttnVariant {
        AttnVariant {
            stream: true,
            ..self
        }
    }

    pub const fn lean(self) -> AttnVariant {
        AttnVariant { lean: true, ..self }
    }

    pub const fn with_timeline(self) -> AttnVariant {
        AttnVariant {
            timeline: true,
            ..self
        }
    }

    pub const fn read_only(self) -> AttnVariant {
        AttnVariant {
            compute: false,
            ..self
        }
    }

    /// What the daemon runs for head size `d` and `g` heads per CTA: the
    /// tensor-core loop on fragments loaded straight into registers at head
    /// size 128 (1-8 heads per CTA) and at 64 with 5-8; elsewhere the lean
    /// SIMT loop with 2 keys per row group loaded one stage ahead into
    /// registers, through the non-coherent path without L1 allocation
    /// (kernels/ATTENTION.md has the measurements: at head size 64 with up
    /// to 4 heads the two loops measured alike, point 41).
    pub fn default_for(d: usize, g: usize) -> AttnVariant {
        if d == 128 || (d == 64 && g > 4) {
            AttnVariant::frag()
        } else {
            AttnVariant::registers(AttnLoad::Prefetch, 2)
                .streaming()
                .lean()
        }
    }

    /// Threads of a CTA.
    pub fn threads(&self) -> usize {
        match self.load {
            AttnLoad::Frag => ATTENTION_FRAG_THREADS,
            _ => ATTENTION_THREADS,
        }
    }

    /// Dynamic shared memory of a CTA (`AttnSmem::BYTES` in
    /// attention/common.cuh, `MmaSmem::BYTES` in lab/attention_variants.cu): the ring or the merge of the row
    /// groups (warps), whichever is larger, then the block-table slice.
    pub fn smem_bytes(&self, d: usize, g: usize) -> usize {
        let (ring, merge) = match self.load {
            AttnLoad::Ring => (
                self.stages * self.keys * 2 * ATTENTION_THREADS * 16,
                g * ATTENTION_THREADS * 8 * 4,
            ),
            AttnLoad::Mma => (
                ATTENTION_THREADS / 32 * self.stages * 2 * 16 * d * 2,
                8 * ATTENTION_THREADS / 32 * d * 4,
            ),
            _ => (0, g * ATTENTION_THREADS * 8 * 4),
        };
        ring.max(merge) + ATTENTION_MAX_SPLIT_PAGES * 4
    }

    /// Short name: `ring4x3`, `direct4x1`, `prefetch2x1`, `mma3`,
    /// `..._read`.
    pub fn tag(&self) -> String {
        let load = match self.load {
            AttnLoad::Ring => "ring",
            AttnLoad::Direct => "direct",
            AttnLoad::Prefetch => "prefetch",
            AttnLoad::Mma => return format!("mma{}", self.stages),
            AttnLoad::Frag => {
                let read = if self.compute { "" } else { "_read" };
                let tl = if self.timeline { "_tl" } else { "" };
                return format!("frag{read}{tl}");
            }
        };
        let read = if self.compute { "" } else { "_read" };
        let nc = if self.stream { "_nc" } else { "" };
        let lean = if self.lean { "_lean" } else { "" };
        let tl = if self.timeline { "_tl" } else { "" };
        format!("{load}{}x{}{read}{nc}{lean}{tl}", self.keys, self.stages)
    }
}

/// Variants instantiated beside the defaults for the Llama-3 shape (head
/// size 128, 4 heads per CTA) in the lab's `attention_variants` module,
/// measured by `tacflowd bench-attention`.
pub const ATTENTION_BENCH_VARIANTS: [AttnVariant; 10] = [
    AttnVariant::frag().read_only(),
    AttnVariant::frag().with_timeline(),
    AttnVariant::registers(AttnLoad::Prefetch, 2)
        .streaming()
        .lean(),
    AttnVariant::registers(AttnLoad::Prefetch, 2)
        .streaming()
        .lean()
        .with_timeline(),
    AttnVariant::registers(AttnLoad::Prefetch, 2).streaming(),
    AttnVariant::registers(AttnLoad::Prefetch, 2),
    AttnVariant::mma(3),
    AttnVariant::registers(AttnLoad::Direct, 4),
    AttnVariant::ring(4, 3),
    AttnVariant::ring(4, 3).read_only(),
];

/// The attention kernel for head size `d`, `g` query heads per CTA and
/// loop shape `v`.
pub fn attention_kernel(d: usize, g: usize, v: AttnVariant) -> String {
    format!("attention_f32_d{d}_g{g}_{}", v.tag())
}

/// An attention kernel with its head size, query heads per CTA and variant
/// (the loader raises each one's shared-memory limit).
pub type AttnKernelSpec = (String, usize, usize, AttnVariant);

/// The daemon's attention kernels: the default loop of every head size and
/// number of heads per CTA.
pub fn attention_kernels() -> Vec<AttnKernelSpec> {
    let mut out = vec![];
    for d in ATTENTION_HEAD_DIMS {
        for g in 1..=ATTENTION_MAX_GROUP {
            let v = AttnVariant::default_for(d, g);
            out.push((attention_kernel(d, g, v), d, g, v));
        }
    }
    out
}

/// The lab's attention variants (module `attention_variants`).
pub fn lab_attention_kernels() -> Vec<AttnKernelSpec> {
    ATTENTION_BENCH_VARIANTS
        .iter()
        .map(|&v| (attention_kernel(128, 4, v), 128, 4, v))
        .collect()
}

/// Every kernel the launch wrappers call, by module: the loader resolves
/// them all (the daemon's modules at start-up, the lab's when the lab
/// loads them), so a missing one fails there and in CI.
pub fn kernel_names(module: &str) -> Vec<String> {
    let fixed: &[&str] = match module {
        "random" => &["random_bf16"],
        "rowwise" => &[
            "embed_bf16",
            "rmsnorm_bf16",
            "rmsnorm_f32",
            "add_f32",
            "add_bias_f32",
            "silu_mul_f32",
            "split_bf16x2",
            "sum_halves_f32",
            "gather_rows_f32",
            "cast_bf16",
        ],
        "rope" => &["rope_f32"],
        "kv" => &["kv_append_bf16", "copy_blocks_bf16"],
        "attention_regs" => &["attention_regs_f32_d128_g4", "attention_regs_merge_f32"],
        "bench" => &["read_ceiling", "spin_wait"],
        #[cfg(feature = "fault-injection")]
        "fault" => &["write_unmapped_u32"],
        "sampling" => &["sample_f32"],
        "fused" => &[
            "add_rmsnorm_f32",
            "add_rmsnorm_bf16",
            "rope_kv_append_bf16",
            "silu_mul_bf16",
        ],
        "tactic" => &TACTIC_KERNELS,
        _ => &[],
    };
    match module {
        "prefill" => return super::prefill::prefill_kernels(false),
        "prefill_variants" => return super::prefill::prefill_kernels(true),
        _ => {}
    }
    let mut names: Vec<String> = fixed.iter().map(|s| s.to_string()).collect();
    let attention = match module {
        "attention" => attention_kernels(),
        "attention_variants" => lab_attention_kernels(),
        _ => vec![],
    };
    names.extend(attention.into_iter().map(|(name, ..)| name));
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `#define NAME <integer or (A * B)>` in a kernel source.
    fn define(src: &str, name: &str) -> usize {
        let line = src
            .lines()
            .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("no #define {name}"));
        let expr = line.split("//").next().unwrap().trim();
        let expr = expr.trim_start_matches('(').trim_end_matches(')');
        expr.split('*')
            .map(|t| {
                let t = t.trim();
                t.parse::<usize>().unwrap_or_else(|_| define(src, t))
            })
            .product()
    }

    #[test]
    fn the_daemon_loads_no_lab_kernel() {
        let product: Vec<String> = MODULES.iter().flat_map(|m| kernel_names(m.name)).collect();
        for m in LAB_MODULES {
            let names = kernel_names(m.name);
            assert!(!names.is_empty(), "{}: no kernels listed", m.name);
            for n in names {
                assert!(
                    !product.contains(&n),
                    "{n} is both the daemon's and the lab's"
                );
            }
        }
        // The kernels the daemon dispatches are all loaded with it.
        for d in ATTENTION_HEAD_DIMS {
            for g in 1..=ATTENTION_MAX_GROUP {
                let k = attention_kernel(d, g, AttnVariant::default_for(d, g));
                assert!(product.contains(&k), "{k}");
            }
        }
    }

    /// The fault kernel is neither the daemon's nor the lab's, and the
    /// product's PTX table (ptx_identity.rs) does not list it.
    #[cfg(feature = "fault-injection")]
    #[test]
    fn the_fault_kernel_is_in_no_other_module() {
        let fault = kernel_names(FAULT_MODULES[0].name);
        assert_eq!(fault, ["write_unmapped_u32"]);
        let others: Vec<String> = MODULES
            .iter()
            .chain(&LAB_MODULES)
            .flat_map(|m| kernel_names(m.name))
            .collect();
        let table = include_str!("../../ptx-identity.tsv");
        for n in &fault {
            assert!(!others.contains(n), "{n} is in another module");
            assert!(!table.contains(n.as_str()), "{n} is in the PTX table");
        }
    }

    #[test]
    fn attention_constants_mirror_the_kernel_source() {
        let src = ATTENTION_HEADERS.map(|h| h.text).concat();
        let src = src.as_str();
        assert_eq!(define(src, "ATT_THREADS"), ATTENTION_THREADS);
        assert_eq!(define(src, "FRAG_THREADS"), AttnVariant::frag().threads());
        assert_eq!(define(src, "MAX_SPLIT_PAGES"), ATTENTION_MAX_SPLIT_PAGES);
    }
}
