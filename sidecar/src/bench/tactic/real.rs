//! Real keys for `bench-tactic --keys DIR`: a capture of a model's
//! post-RoPE keys and decode queries in the format `bench/tactic/dump_qk.py`
//! writes (SmolLM2-135M on a long text, through transformers):
//!
//! - `k_post.npy` `[layers, kv_heads, n, d]` f32: keys after RoPE, as cached;
//! - `q.npy` `[layers, windows * steps, heads, d]` f32: the queries after
//!   RoPE at positions `end − steps .. end` of each window;
//! - `meta.json`: `window_ends`, `steps`.
//!
//! Sequence `s` of a batch is layer `s mod layers` of the last window (its
//! keys up to the window's end, its last `steps` queries as decode steps):
//! a batch larger than the model's layers repeats layers.

use super::keys::SeqKeys;
use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;

/// A little-endian f32 `.npy` array, C order.
struct Npy {
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn bad(path: &Path, why: &str) -> Error {
    Error::Config(format!("{}: {why}", path.display()))
}

fn read_npy(path: &Path) -> Result<Npy> {
    let mut bytes = vec![];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| bad(path, &e.to_string()))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad(path, "not a .npy file"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad(path, "truncated header")),
    };
    let header = std::str::from_utf8(bytes.get(start..start + hlen).unwrap_or_default())
        .map_err(|_| bad(path, "header not UTF-8"))?;
    if !header.contains("'<f4'") || header.contains("'fortran_order': True") {
        return Err(bad(path, "expected little-endian f32 in C order"));
    }
    let shape: Vec<usize> = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split(['(', ')']).nth(1))
        .ok_or_else(|| bad(path, "no shape"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad(path, "bad shape")))
        .collect::<Result<_>>()?;
    let body = &bytes[start + hlen..];
    let n: usize = shape.iter().product();
    if body.len() != 4 * n {
        return Err(bad(path, "data size differs from the shape"));
    }
    let data = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Npy { shape, data })
}

/// An opened capture directory.
pub struct Capture {
    k: Npy,
    q: Npy,
    end: usize,
    /// Index of the last window's first query row in `q`.
    q_first: usize,
    dump_steps: usize,
}

impl Capture {
    pub fn open(dir: &Path) -> Result<Capture> {
        let k = read_npy(&dir.join("k_post.npy"))?;
        let q = read_npy(&dir.join("q.npy"))?;
        let meta_path = dir.join("meta.json");
        let meta: serde_json::Value = std::fs::read_to_string(&meta_path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .ok_or_else(|| bad(&meta_path, "unreadable"))?;
        let ends: Vec<usize> = meta["window_ends"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as usize)
                    .collect()
            })
            .unwrap_or_default();
        let dump_steps = meta["steps"].as_u64().unwrap_or(0) as usize;
        let (Some(&end), true) = (ends.last(), dump_steps > 0) else {
            return Err(bad(&meta_path, "no window_ends or steps"));
        };
        let ok = k.shape.len() == 4
            && q.shape.len() == 4
            && q.shape[0] == k.shape[0]
            && q.shape[1] == ends.len() * dump_steps
            && q.shape[3] == k.shape[3]
            && k.shape[1] > 0
            && q.shape[2] % k.shape[1] == 0
            && end <= k.shape[2];
        if !ok {
            return Err(bad(dir, "k_post.npy, q.npy and meta.json disagree"));
        }
        Ok(Capture {
            q_first: (ends.len() - 1) * dump_steps,
            k,
            q,
            end,
            dump_steps,
        })
    }

    /// (query heads, KV heads, head size).
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.q.shape[2], self.k.shape[1], self.k.shape[3])
    }

    /// Sequence `s`: layer `s mod layers`, the last window's last `steps`
    /// queries.
    pub fn sequence(&self, s: usize, steps: usize) -> Result<SeqKeys> {
        if steps > self.dump_steps {
            return Err(Error::Config(format!(
                "the capture holds {} decode queries per window, not {steps}",
                self.dump_steps
            )));
        }
        let (nh, kvh, d) = self.shape();
        let (layers, n_all) = (self.k.shape[0], self.k.shape[2]);
        let l = s % layers;
        let keys = (0..kvh)
            .map(|h| {
                let at = (l * kvh + h) * n_all * d;
                self.k.data[at..at + self.end * d].to_vec()
            })
            .collect();
        let rows = self.q.shape[1];
        let queries = (0..steps)
            .map(|t| {
                let i = self.q_first + self.dump_steps - steps + t;
                let at = (l * rows + i) * nh * d;
                self.q.data[at..at + nh * d].to_vec()
            })
            .collect();
        Ok(SeqKeys {
            n: self.end,
            head_dim: d,
            keys,
            queries,
            seed: s as u64,
            calibration: vec![],
        })
    }
}
