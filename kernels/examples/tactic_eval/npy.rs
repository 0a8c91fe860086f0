//! A tiny reader for the `.npy` files `bench/tactic/dump_qk.py` writes:
//! little-endian f32, C order, version 1 or 2 headers.

use std::io::Read;

/// An n-dimensional f32 array.
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub fn read_f32(path: &std::path::Path) -> anyhow::Result<Array> {
    let mut f = std::fs::File::open(path)?;
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic)?;
    anyhow::ensure!(
        &magic[..6] == b"\x93NUMPY",
        "{}: not an npy file",
        path.display()
    );
    let hlen = if magic[6] == 1 {
        let mut b = [0u8; 2];
        f.read_exact(&mut b)?;
        u16::from_le_bytes(b) as usize
    } else {
        let mut b = [0u8; 4];
        f.read_exact(&mut b)?;
        u32::from_le_bytes(b) as usize
    };
    let mut h = vec![0u8; hlen];
    f.read_exact(&mut h)?;
    let h = String::from_utf8(h)?;
    anyhow::ensure!(
        h.contains("'descr': '<f4'"),
        "{}: not little-endian f32: {h}",
        path.display()
    );
    anyhow::ensure!(
        h.contains("'fortran_order': False"),
        "{}: Fortran order",
        path.display()
    );
    let s = &h[h
        .find("'shape': (")
        .ok_or_else(|| anyhow::anyhow!("no shape"))?
        + 10..];
    let s = &s[..s.find(')').ok_or_else(|| anyhow::anyhow!("bad shape"))?];
    let shape: Vec<usize> = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let mut bytes = vec![0u8; n * 4];
    f.read_exact(&mut bytes)?;
    let data = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(Array { shape, data })
}

/// The integers of a JSON list field `"name": [a, b, ...]` or number field.
pub fn json_ints(text: &str, name: &str) -> anyhow::Result<Vec<usize>> {
    let key = format!("\"{name}\":");
    let at = text
        .find(&key)
        .ok_or_else(|| anyhow::anyhow!("meta.json: no {name}"))?
        + key.len();
    let rest = text[at..].trim_start();
    let body = if let Some(r) = rest.strip_prefix('[') {
        &r[..r
            .find(']')
            .ok_or_else(|| anyhow::anyhow!("meta.json: bad {name}"))?]
    } else {
        &rest[..rest.find([',', '\n', '}']).unwrap_or(rest.len())]
    };
    Ok(body
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?)
}
