//! GGML tensor encodings and their decoding to f32.
//!
//! Block formats, written from GGML's definitions (`ggml-common.h`). Every
//! quantised row is cut into blocks of 32 values (the legacy types) or 256
//! (the K-quants) and each block carries its own scale:
//!
//! | type | bytes | layout | value |
//! | --- | --- | --- | --- |
//! | Q4_0 | 18 | d, 16 B nibbles | `d·(q−8)` |
//! | Q4_1 | 20 | d, m, 16 B nibbles | `d·q + m` |
//! | Q5_0 | 22 | d, 4 B high bits, 16 B nibbles | `d·(q−16)` |
//! | Q5_1 | 24 | d, m, 4 B high bits, 16 B nibbles | `d·q + m` |
//! | Q8_0 | 34 | d, 32 i8 | `d·q` |
//! | Q2_K | 84 | 16 B scale/min nibbles, 64 B 2-bit q, d, dmin | `d·sc·q − dmin·m` |
//! | Q3_K | 110 | 32 B high bits, 64 B 2-bit q, 12 B 6-bit scales, d | `d·(sc−32)·(q−4·!h)` |
//! | Q4_K | 144 | d, dmin, 12 B 6-bit scales/mins, 128 B nibbles | `d·sc·q − dmin·m` |
//! | Q5_K | 176 | d, dmin, 12 B scales/mins, 32 B high bits, 128 B nibbles | `d·sc·q − dmin·m` |
//! | Q6_K | 210 | 128 B low nibbles, 64 B high pairs, 16 i8 scales, d | `d·sc·(q−32)` |
//!
//! In the 32-value types, byte `j` holds value `j` in its low nibble and
//! value `j + 16` in its high one. `d`, `m` and `dmin` are f16.

use half::f16;
use rayon::prelude::*;

/// A tensor's encoding (GGML's type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// Any other id (importance-matrix quants, integers, ...).
    Other(u32),
}

impl GgmlType {
    /// The types [`to_f32`] decodes.
    pub const SUPPORTED: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Bf16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    pub fn from_id(id: u32) -> GgmlType {
        Self::SUPPORTED
            .into_iter()
            .find(|t| t.id() == id)
            .unwrap_or(GgmlType::Other(id))
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Bf16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// GGML's name of the type.
    pub fn name(self) -> String {
        let known = match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Bf16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Other(id) => {
                const OTHERS: [&str; 29] = [
                    "", "", "", "", "Q4_2", "Q4_3", "", "", "", "Q8_1", "", "", "", "", "", "Q8_K",
                    "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
                    "I8", "I16", "I32", "I64", "F64",
                ];
                return match OTHERS.get(id as usize) {
                    Some(n) if !n.is_empty() => format!("{n} (type {id})"),
                    _ => format!("type {id}"),
                };
            }
        };
        known.to_owned()
    }

    /// `(values, bytes)` of one block; `None` for types we cannot decode.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q2K => (256, 84),
            GgmlType::Q3K => (256, 110),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
            GgmlType::Other(_) => return None,
        })
    }

    /// Bytes of `numel` values; `None` for types we cannot decode or a
    /// count that is not a whole number of blocks.
    pub fn byte_size(self, numel: u64) -> Option<u64> {
        let (vals, bytes) = self.block()?;
        numel
            .is_multiple_of(vals as u64)
            .then(|| numel / vals as u64 * bytes as u64)
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Decodes `bytes` (whole blocks of `ty`) to f32; `None` if `ty` is not
/// supported.
pub fn to_f32(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    let block: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = half(b, 0),
        GgmlType::Bf16 => {
            |b, y| y[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
        }
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q2K => q2_k,
        GgmlType::Q3K => q3_k,
        GgmlType::Q4K => q4_k,
        GgmlType::Q5K => q5_k,
        GgmlType::Q6K => q6_k,
        GgmlType::Other(_) => return None,
    };
    let (vals, size) = ty.block()?;
    let mut out = vec![0f32; bytes.len() / size * vals];
    // Chunks of many blocks, so that per-task overhead stays small.
    let per_task = 1024usize.div_ceil(vals).max(1) * 16;
    out.par_chunks_mut(per_task * vals)
        .zip(bytes.par_chunks(per_task * size))
        .for_each(|(y, b)| {
            for (y, b) in y.chunks_exact_mut(vals).zip(b.chunks_exact(size)) {
                block(b, y);
            }
        });
    Some(out)
}

/// Value `j` and `j + 16` of a 32-value block from the nibbles of byte `j`.
fn nibbles(qs: &[u8], y: &mut [f32], f: impl Fn(u8) -> f32) {
    for (j, &q) in qs.iter().enumerate() {
        y[j] = f(q & 0xF);
        y[j + 16] = f(q >> 4);
    }
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    nibbles(&b[2..18], y, |q| (i32::from(q) - 8) as f32 * d);
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    nibbles(&b[4..20], y, |q| f32::from(q) * d + m);
}

/// The fifth bits of a 32-value block: bit `j` of the little-endian `u32`
/// belongs to value `j`.
fn fifth_bits(qh: &[u8], qs: &[u8], y: &mut [f32], f: impl Fn(u8) -> f32) {
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let bit = |j: usize| (((h >> j) & 1) as u8) << 4;
    for (j, &q) in qs.iter().enumerate() {
        y[j] = f((q & 0xF) | bit(j));
        y[j + 16] = f((q >> 4) | bit(j + 16));
    }
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    fifth_bits(&b[2..6], &b[6..22], y, |q| (i32::from(q) - 16) as f32 * d);
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    fifth_bits(&b[4..8], &b[8..24], y, |q| f32::from(q) * d + m);
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = f32::from(q as i8) * d;
    }
}

/// Q2_K: 16 groups of 16 values. Group `g` lives in the 32-byte half
/// `g / 8` of `qs`, bytes `16·(g % 2)..`, at bit shift `2·((g / 2) % 4)`.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half(b, 80), half(b, 82));
    for (g, y) in y.chunks_exact_mut(16).enumerate() {
        let (sc, m) = (scales[g] & 0xF, scales[g] >> 4);
        let (dl, ml) = (d * f32::from(sc), dmin * f32::from(m));
        let q = &qs[32 * (g / 8) + 16 * (g % 2)..][..16];
        let shift = 2 * ((g / 2) % 4);
        for (y, &q) in y.iter_mut().zip(q) {
            *y = dl * f32::from((q >> shift) & 3) - ml;
        }
    }
}

/// Q3_K: 16 groups of 16, laid out as in Q2_K; the third bit of value `i`
/// of group `g` is bit `g / 2` of `hmask[16·(g % 2) + i]`, and a clear bit
/// subtracts 4. The 6-bit scales: low nibbles in bytes 0..8 (groups 0..8
/// low, 8..16 high), top two bits in bytes 8..12.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, s) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = half(b, 108);
    for (g, y) in y.chunks_exact_mut(16).enumerate() {
        let low = if g < 8 { s[g] & 0xF } else { s[g - 8] >> 4 };
        let high = (s[8 + g % 4] >> (2 * (g / 4))) & 3;
        let dl = d * f32::from(i16::from(low | (high << 4)) - 32);
        let off = 16 * (g % 2);
        let q = &qs[32 * (g / 8) + off..][..16];
        let h = &hmask[off..off + 16];
        let shift = 2 * ((g / 2) % 4);
        for ((y, &q), &h) in y.iter_mut().zip(q).zip(h) {
            let sub = if h & (1 << (g / 2)) != 0 { 0 } else { 4 };
            *y = dl * f32::from(i16::from((q >> shift) & 3) - sub);
        }
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K
/// and Q5_K: six bits each, the top two bits of 4..8 stored in 0..8.
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (f32::from(sc), f32::from(m))
}

/// Q4_K: 8 sub-blocks of 32; sub-blocks `2c` and `2c + 1` are the low and
/// high nibbles of bytes `32c..32c + 32`.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin, s, qs) = (half(b, 0), half(b, 2), &b[4..16], &b[16..144]);
    for (j, y) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(j, s);
        let (dl, ml) = (d * sc, dmin * m);
        let shift = 4 * (j % 2);
        for (y, &q) in y.iter_mut().zip(&qs[32 * (j / 2)..][..32]) {
            *y = dl * f32::from((q >> shift) & 0xF) - ml;
        }
    }
}

/// Q5_K: Q4_K plus a fifth bit, bit `j` of `qh[i]` for value `i` of
/// sub-block `j`.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin, s) = (half(b, 0), half(b, 2), &b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (j, y) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(j, s);
        let (dl, ml) = (d * sc, dmin * m);
        let shift = 4 * (j % 2);
        let q = &qs[32 * (j / 2)..][..32];
        for ((y, &q), &h) in y.iter_mut().zip(q).zip(qh) {
            let hi = ((h >> j) & 1) << 4;
            *y = dl * f32::from(((q >> shift) & 0xF) | hi) - ml;
        }
    }
}

/// Q6_K: two halves of 128 values; in half `n`, value `32k + l` (k in 0..4)
/// takes its low nibble from `ql[64n + l + 32·(k % 2)]` (high nibble for
/// k ≥ 2) and its top two bits from `qh[32n + l]` at shift `2k`; sixteen
/// groups of 16 share an i8 scale.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half(b, 208);
    for (i, y) in y.iter_mut().enumerate() {
        let (n, k, l) = (i / 128, (i % 128) / 32, i % 32);
        let lo = (ql[64 * n + l + 32 * (k % 2)] >> (4 * (k / 2))) & 0xF;
        let hi = (qh[32 * n + l] >> (2 * k)) & 3;
        let q = i16::from(lo | (hi << 4)) - 32;
        *y = d * f32::from(sc[i / 16] as i8) * f32::from(q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn decode(ty: GgmlType, b: &[u8]) -> Vec<f32> {
        to_f32(ty, b).unwrap()
    }

    #[test]
    fn ids_and_sizes() {
        for t in GgmlType::SUPPORTED {
            assert_eq!(GgmlType::from_id(t.id()), t);
        }
        assert_eq!(GgmlType::from_id(19).name(), "IQ1_S (type 19)");
        assert_eq!(GgmlType::from_id(99).name(), "type 99");
        assert_eq!(GgmlType::Q4_1.byte_size(64), Some(40));
        assert_eq!(GgmlType::Q4_1.byte_size(48), None);
        assert_eq!(GgmlType::Q6K.byte_size(512), Some(420));
    }

    #[test]
    fn plain_floats() {
        let b: Vec<u8> = [1.5f32, -0.0, 3e38]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(decode(GgmlType::F32, &b), [1.5, -0.0, 3e38]);
        let b = [f16b(0.5), f16b(-65504.0)].concat();
        assert_eq!(decode(GgmlType::F16, &b), [0.5, -65504.0]);
        // bf16 0x3FC0 = 1.5, 0xC2F7 = -123.5.
        assert_eq!(
            decode(GgmlType::Bf16, &[0xC0, 0x3F, 0xF7, 0xC2]),
            [1.5, -123.5]
        );
    }

    /// Nibble bytes with value `j` low and `15 − j` high, so each position
    /// is distinguishable.
    fn ramp16() -> Vec<u8> {
        (0..16u8).map(|j| j | ((15 - j) << 4)).collect()
    }

    #[test]
    fn q4_blocks() {
        let b = [&f16b(0.5)[..], &ramp16()].concat();
        let y = decode(GgmlType::Q4_0, &b);
        assert_eq!(y[0], -4.0); // (0 − 8)·0.5
        assert_eq!(y[3], -2.5); // (3 − 8)·0.5
        assert_eq!(y[16], 3.5); // (15 − 8)·0.5
        assert_eq!(y[31], -4.0); // (0 − 8)·0.5
        let b = [&f16b(0.25)[..], &f16b(-1.0), &ramp16()].concat();
        let y = decode(GgmlType::Q4_1, &b);
        assert_eq!(y[5], 0.25); // 5·0.25 − 1
        assert_eq!(y[16], 2.75); // 15·0.25 − 1
        assert_eq!(y[20], 1.75); // 11·0.25 − 1
    }

    #[test]
    fn q5_blocks() {
        // Fifth bits set for values 1 and 17 only.
        let qh = ((1u32 << 1) | (1 << 17)).to_le_bytes();
        let b = [&f16b(2.0)[..], &qh, &ramp16()].concat();
        let y = decode(GgmlType::Q5_0, &b);
        assert_eq!(y[0], -32.0); // (0 − 16)·2
        assert_eq!(y[1], 2.0); // (1 + 16 − 16)·2
        assert_eq!(y[16], -2.0); // (15 − 16)·2
        assert_eq!(y[17], 28.0); // (14 + 16 − 16)·2
        let b = [&f16b(0.5)[..], &f16b(1.0), &qh, &ramp16()].concat();
        let y = decode(GgmlType::Q5_1, &b);
        assert_eq!(y[1], 9.5); // 17·0.5 + 1
        assert_eq!(y[17], 16.0); // 30·0.5 + 1
        assert_eq!(y[2], 2.0); // 2·0.5 + 1
    }

    #[test]
    fn q8_block() {
        let qs: Vec<u8> = (0..32).map(|i| (i as i8 - 16) as u8).collect();
        let b = [&f16b(0.125)[..], &qs].concat();
        let y = decode(GgmlType::Q8_0, &b);
        assert_eq!((y[0], y[16], y[31]), (-2.0, 0.0, 1.875));
    }

    #[test]
    fn q4_k_block() {
        let mut s = [0u8; 12];
        s[0] = 2 | (1 << 6); // scale of sub-block 0 = 2; top bits of scale 4 = 1
        s[4] = 3 | (2 << 6); // min of sub-block 0 = 3; top bits of min 4 = 2
        s[8] = 5 | (7 << 4); // sub-block 4: scale low 5, min low 7
        let mut qs = [0u8; 128];
        qs[0] = 9 | (4 << 4); // sub-block 0 value 0: 9; sub-block 1 value 0: 4
        qs[64 + 3] = 6; // sub-block 4 value 3: 6
        let b = [&f16b(0.5)[..], &f16b(0.25), &s, &qs].concat();
        let y = decode(GgmlType::Q4K, &b);
        assert_eq!(y[0], 0.5 * 2.0 * 9.0 - 0.25 * 3.0);
        assert_eq!(y[1], -0.75);
        assert_eq!(y[32], 0.0); // sub-block 1: scale and min 0
        // Sub-block 4: scale 5 | 1 << 4 = 21, min 7 | 2 << 4 = 39.
        assert_eq!(y[128 + 3], 0.5 * 21.0 * 6.0 - 0.25 * 39.0);
    }

    #[test]
    fn q5_k_block() {
        let mut s = [0u8; 12];
        s[3] = 4; // sub-block 3: scale 4, min 0
        let mut qh = [0u8; 32];
        qh[2] = 1 << 3; // fifth bit of value 2 of sub-block 3
        let mut qs = [0u8; 128];
        qs[32 + 2] = 1 << 4; // high nibble: sub-block 3, value 2
        let b = [&f16b(1.0)[..], &f16b(0.0), &s, &qh, &qs].concat();
        let y = decode(GgmlType::Q5K, &b);
        assert_eq!(y[96 + 2], 4.0 * 17.0);
        assert_eq!(y[96 + 1], 0.0);
    }

    #[test]
    fn q6_k_block() {
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        let mut sc = [1u8; 16];
        ql[0] = 5; // value 0: low 5
        ql[32 + 1] = 7 << 4; // value 96 + 1 (k = 3): low 7
        qh[1] = 2 << 6; // value 97: top bits 2
        qh[32] = 3 << 2; // value 128 + 32 (second half, k = 1): top bits 3
        sc[6] = (-2i8) as u8; // group of values 96..112
        let b = [&ql[..], &qh, &sc, &f16b(0.5)].concat();
        let y = decode(GgmlType::Q6K, &b);
        assert_eq!(y[0], 0.5 * (5.0 - 32.0));
        assert_eq!(y[97], 0.5 * -2.0 * (7.0 + 32.0 - 32.0));
        assert_eq!(y[160], 0.5 * (48.0 - 32.0));
        assert_eq!(y[1], -16.0);
    }

    #[test]
    fn q2_k_and_q3_k_blocks() {
        let mut scales = [0u8; 16];
        scales[5] = 3 | (2 << 4); // group 5: scale 3, min 2
        let mut qs = [0u8; 64];
        qs[16] = 2 << 4; // group 5 = half 0, bytes 16.., shift 4: value 80 → 2
        let b = [&scales[..], &qs, &f16b(1.0), &f16b(0.5)].concat();
        let y = decode(GgmlType::Q2K, &b);
        assert_eq!(y[80], 3.0 * 2.0 - 0.5 * 2.0);
        assert_eq!(y[81], -1.0);
        assert_eq!(y[0], 0.0);

        let mut hmask = [0xFFu8; 32];
        hmask[16] = !(1 << 4); // group 9 (bit 9 / 2 = 4) value 0: third bit clear
        let mut qs = [0u8; 64];
        qs[32 + 16] = 1; // group 9 = half 1, bytes 16.., shift 2·((9 / 2) % 4) = 0
        let mut s = [0u8; 12];
        s[1] = 0x50; // low nibble of scale 9 = 5
        s[9] = 0b10 << 4; // top bits of scale 9 (9 % 4 = 1, shift 2·(9 / 4) = 4)
        let b = [&hmask[..], &qs, &s, &f16b(0.5)].concat();
        let y = decode(GgmlType::Q3K, &b);
        // Scale 9 = 5 | 2 << 4 = 37 → 37 − 32 = 5; q = 1 − 4.
        assert_eq!(y[144], 0.5 * 5.0 * -3.0);
        assert_eq!(y[145], 0.0); // q = 0, bit set
        assert_eq!(y[0], 0.5 * -32.0 * 0.0);
    }
}
