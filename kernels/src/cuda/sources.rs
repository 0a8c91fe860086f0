//! The CUDA sources, one `.cu` file per kernel family, embedded in the
//! binary. Each module is compiled as the shared prelude followed by its
//! file, so no header or include path is ever needed.

/// Helpers every module starts with: bf16 bit conversions, reductions, the
/// counter-based generator (the twin of `crate::rng`).
pub const PRELUDE: &str = include_str!("kernels/prelude.cuh");

/// One compilation unit.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    pub name: &'static str,
    pub source: &'static str,
}

impl Module {
    /// The text NVRTC compiles: the prelude, then the file (with a `#line`
    /// so that errors point into the file).
    pub fn full_source(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}.cu\"\n{}", self.name, self.source)
    }
}

pub const MODULES: [Module; 6] = [
    Module {
        name: "random",
        source: include_str!("kernels/random.cu"),
    },
    Module {
        name: "rowwise",
        source: include_str!("kernels/rowwise.cu"),
    },
    Module {
        name: "rope",
        source: include_str!("kernels/rope.cu"),
    },
    Module {
        name: "kv",
        source: include_str!("kernels/kv.cu"),
    },
    Module {
        name: "attention",
        source: include_str!("kernels/attention.cu"),
    },
    Module {
        name: "sampling",
        source: include_str!("kernels/sampling.cu"),
    },
];

/// Head sizes and query heads per CTA that `attention.cu` instantiates.
pub const ATTENTION_HEAD_DIMS: [usize; 5] = [16, 32, 64, 128, 256];
pub const ATTENTION_MAX_GROUP: usize = 8;

/// The attention kernel for head size `d` and `g` query heads per CTA.
pub fn attention_kernel(d: usize, g: usize) -> String {
    format!("attention_f32_d{d}_g{g}")
}

/// Every kernel the launch wrappers call, by module: the loader resolves
/// them all at start-up, so a missing one fails there and in CI.
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
        "attention" => &["attention_merge_f32"],
        "sampling" => &["sample_f32"],
        _ => &[],
    };
    let mut names: Vec<String> = fixed.iter().map(|s| s.to_string()).collect();
    if module == "attention" {
        for d in ATTENTION_HEAD_DIMS {
            for g in 1..=ATTENTION_MAX_GROUP {
                names.push(attention_kernel(d, g));
            }
        }
    }
    names
}
