//! Host shared-memory regions: client memory the daemon maps and reads or
//! writes in place (`PROTOCOL.md` §3).
//!
//! The client may write to the same pages at any time, so the mapping is
//! never turned into a Rust slice: every access is a raw copy of checked
//! bounds ([`memmap2::MmapRaw`]).
//!
//! By-name regions ([`HostRegion::open_shm`]) can be truncated by their
//! owner while mapped; they are guarded ([`crate::sigbus`]) so that the
//! access that would fault completes into zero pages and fails its request
//! instead of killing the daemon. Memfd regions ([`HostRegion::from_fd`])
//! are sealed against shrinking and need no guard.

use crate::error::{Error, ErrorCode, ErrorReply, Result};
use crate::sigbus::Guard;
use crate::tensor::{DType, TensorView};
use half::{bf16, f16};
use memmap2::MmapRaw;
use nix::fcntl::OFlag;
use nix::sys::mman::shm_open;
use nix::sys::stat::{Mode, fstat};
use std::fs::File;
use std::os::fd::OwnedFd;

/// A mapped host region.
pub struct HostRegion {
    label: String,
    /// Declared before `map`: the range is unguarded before it is unmapped.
    guard: Option<Guard>,
    map: MmapRaw,
    size: u64,
    owner_uid: u32,
}

impl std::fmt::Debug for HostRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRegion")
            .field("label", &self.label)
            .field("size", &self.size)
            .field("owner_uid", &self.owner_uid)
            .field("guarded", &self.guard.is_some())
            .finish()
    }
}

fn os(op: &'static str, name: &str, e: impl Into<std::io::Error>) -> Error {
    Error::Os {
        op,
        name: name.to_owned(),
        source: e.into(),
    }
}

/// Checks a POSIX shared-memory name and returns it with its leading slash.
/// Python's `multiprocessing.shared_memory` reports names without one.
pub fn normalize_shm_name(name: &str) -> Result<String, ErrorReply> {
    let bare = name.strip_prefix('/').unwrap_or(name);
    let ok = !bare.is_empty()
        && bare.len() <= 250
        && bare != "."
        && bare != ".."
        && !bare.contains('/')
        && !bare.contains('\0');
    if !ok {
        return Err(ErrorReply::bad_request(format!(
            "invalid shared-memory name {name:?}: one path component of 1 to 250 bytes"
        )));
    }
    Ok(format!("/{bare}"))
}

impl HostRegion {
    /// Maps `byte_size` bytes of the shared-memory object `name`.
    pub fn open_shm(name: &str, byte_size: u64) -> Result<HostRegion> {
        let name = normalize_shm_name(name)?;
        let fd = shm_open(name.as_str(), OFlag::O_RDWR, Mode::empty()).map_err(|e| {
            let code = match e {
                nix::errno::Errno::ENOENT => ErrorCode::UnknownRegion,
                nix::errno::Errno::EACCES | nix::errno::Errno::EPERM => ErrorCode::PermissionDenied,
                _ => ErrorCode::BadRequest,
            };
            Error::Protocol(ErrorReply::new(
                code,
                format!("cannot open shared memory {name}: {e}"),
            ))
        })?;
        let mut region = Self::from_fd(fd, byte_size, name)?;
        let guard = Guard::new(region.map.as_ptr(), region.map.len()).ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::LimitExceeded,
                format!(
                    "the daemon holds {} by-name regions, its most; use memfd regions",
                    crate::sigbus::SLOTS
                ),
            )
        })?;
        region.guard = Some(guard);
        Ok(region)
    }

    /// Maps `byte_size` bytes of an open file descriptor (a shm object or a
    /// memfd). The object must be at least that large.
    pub fn from_fd(fd: OwnedFd, byte_size: u64, label: String) -> Result<HostRegion> {
        if byte_size == 0 {
            return Err(ErrorReply::bad_request("a region must have a byte_size above 0").into());
        }
        let st = fstat(&fd).map_err(|e| os("fstat", &label, e))?;
        let actual = u64::try_from(st.st_size).unwrap_or(0);
        if actual < byte_size {
            return Err(ErrorReply::new(
                ErrorCode::OutOfBounds,
                format!("{label} holds {actual} bytes, fewer than the {byte_size} declared"),
            )
            .with("actual", actual)
            .with("declared", byte_size)
            .into());
        }
        let len = usize::try_from(byte_size)
            .map_err(|_| ErrorReply::bad_request("byte_size does not fit this machine"))?;
        let file = File::from(fd);
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| os("mmap", &label, e))?;
        Ok(HostRegion {
            label,
            guard: None,
            map,
            size: byte_size,
            owner_uid: st.st_uid,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Owner of the backing object, for the daemon's permission rule.
    pub fn owner_uid(&self) -> u32 {
        self.owner_uid
    }

    /// Whether its owner truncated it under the mapping: its pages were
    /// replaced with zeros and every later access fails.
    pub fn is_poisoned(&self) -> bool {
        self.guard.as_ref().is_some_and(Guard::poisoned)
    }

    /// The error of every access after [`HostRegion::is_poisoned`].
    pub fn poisoned_error(&self) -> ErrorReply {
        ErrorReply::new(
            ErrorCode::OutOfBounds,
            format!(
                "region {} shrank below its registered {} bytes while mapped (its owner \
                 truncated it); the daemon dropped its memory: unregister it and register \
                 a new region",
                self.label, self.size
            ),
        )
        .with("truncated", 1u64)
    }

    fn after_access(&self) -> Result<(), ErrorReply> {
        if self.is_poisoned() {
            return Err(self.poisoned_error());
        }
        Ok(())
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), ErrorReply> {
        self.after_access()?;
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(ErrorReply::new(
                ErrorCode::OutOfBounds,
                format!("{} bytes at {offset} exceed region {}", len, self.label),
            )
            .with("region_size", self.size));
        }
        Ok(())
    }

    /// Copies `src` into the region at byte `offset`.
    pub fn write_bytes(&self, offset: u64, src: &[u8]) -> Result<(), ErrorReply> {
        self.check(offset, src.len())?;
        // SAFETY: `check` proved offset..offset+len lies inside the mapping,
        // which lives as long as `self`. Raw copies tolerate the client
        // writing the same bytes concurrently (the data is then unspecified,
        // which is the client's own race, but no Rust reference aliases it).
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.map.as_mut_ptr().add(offset as usize),
                src.len(),
            );
        }
        self.after_access()
    }

    /// Copies bytes out of the region at byte `offset` into `dst`.
    pub fn read_bytes(&self, offset: u64, dst: &mut [u8]) -> Result<(), ErrorReply> {
        self.check(offset, dst.len())?;
        // SAFETY: as in `write_bytes`, the range is inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset as usize),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
        self.after_access()
    }

    /// Writes a row-major `[rows, cols]` f32 matrix into a 2-D view of this
    /// region, converting to the view's dtype (f32, f16 or bf16) and honouring
    /// its strides. The view must have been resolved against this region.
    pub fn write_matrix_f32(&self, view: &TensorView, data: &[f32]) -> Result<(), ErrorReply> {
        let (rows, cols) = match view.shape[..] {
            [r, c] => (r as usize, c as usize),
            _ => return Err(ErrorReply::bad_request("write_matrix_f32 needs a 2-D view")),
        };
        if data.len() != rows * cols {
            return Err(ErrorReply::internal("matrix size does not match its view"));
        }
        let mut buf: Vec<u8> = Vec::new();
        for r in 0..rows {
            let row = &data[r * cols..(r + 1) * cols];
            if view.rows_contiguous() {
                encode_row(view.dtype, row, &mut buf)?;
                self.write_bytes(view.byte_offset(&[r as u64, 0]), &buf)?;
            } else {
                for (c, &x) in row.iter().enumerate() {
                    encode_row(view.dtype, &[x], &mut buf)?;
                    self.write_bytes(view.byte_offset(&[r as u64, c as u64]), &buf)?;
                }
            }
        }
        Ok(())
    }
}

fn encode_row(dtype: DType, row: &[f32], buf: &mut Vec<u8>) -> Result<(), ErrorReply> {
    buf.clear();
    match dtype {
        DType::F32 => buf.extend(row.iter().flat_map(|x| x.to_le_bytes())),
        DType::F16 => buf.extend(row.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes())),
        DType::Bf16 => buf.extend(row.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes())),
        other => {
            return Err(ErrorReply::new(
                ErrorCode::DtypeMismatch,
                format!("cannot write floats as {}", other.name()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorRef;
    use nix::sys::mman::shm_unlink;
    use nix::unistd::ftruncate;

    struct Shm(String);
    impl Drop for Shm {
        fn drop(&mut self) {
            let _ = shm_unlink(self.0.as_str());
        }
    }

    fn make_shm(size: i64) -> Shm {
        let name = format!("/tacflow-test-{}-{}", std::process::id(), rand_suffix());
        let fd = shm_open(
            name.as_str(),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL,
            Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        ftruncate(&fd, size).unwrap();
        Shm(name)
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(normalize_shm_name("psm_1").unwrap(), "/psm_1");
        assert_eq!(normalize_shm_name("/psm_1").unwrap(), "/psm_1");
        assert!(normalize_shm_name("a/b").is_err());
        assert!(normalize_shm_name("/").is_err());
        assert!(normalize_shm_name("..").is_err());
    }

    #[test]
    fn map_write_read_and_bounds() {
        let shm = make_shm(4096);
        let r = HostRegion::open_shm(&shm.0, 4096).unwrap();
        assert_eq!(r.owner_uid(), nix::unistd::getuid().as_raw());
        r.write_bytes(4000, &[1, 2, 3]).unwrap();
        let mut back = [0u8; 3];
        r.read_bytes(4000, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3]);
        assert!(r.write_bytes(4094, &[0; 3]).is_err());
        assert!(r.read_bytes(u64::MAX, &mut back).is_err());
    }

    #[test]
    fn declared_size_larger_than_object_is_refused() {
        let shm = make_shm(100);
        let err = HostRegion::open_shm(&shm.0, 101).unwrap_err();
        assert!(matches!(err, Error::Protocol(e) if e.code == ErrorCode::OutOfBounds));
        let err = HostRegion::open_shm("/tacflow-does-not-exist", 8).unwrap_err();
        assert!(matches!(err, Error::Protocol(e) if e.code == ErrorCode::UnknownRegion));
    }

    #[test]
    fn a_region_truncated_under_its_mapping_fails_instead_of_crashing() {
        let shm = make_shm(3 * 4096);
        let r = HostRegion::open_shm(&shm.0, 3 * 4096).unwrap();
        r.write_bytes(8192, &[7; 16]).unwrap();
        // The owner truncates the object: pages past the end now SIGBUS.
        let fd = shm_open(shm.0.as_str(), OFlag::O_RDWR, Mode::empty()).unwrap();
        ftruncate(&fd, 4096).unwrap();
        let err = r.write_bytes(8192, &[1; 64]).unwrap_err();
        assert_eq!(err.code, ErrorCode::OutOfBounds);
        assert!(err.message.contains("truncated"), "{}", err.message);
        assert!(r.is_poisoned());
        let mut back = [0u8; 4];
        assert!(
            r.read_bytes(0, &mut back).is_err(),
            "every later access fails"
        );
        // Other regions are untouched.
        let other = make_shm(4096);
        let o = HostRegion::open_shm(&other.0, 4096).unwrap();
        o.write_bytes(0, &[1, 2]).unwrap();
        assert!(!o.is_poisoned());
    }

    #[test]
    fn matrix_write_honours_dtype_and_strides() {
        let shm = make_shm(1024);
        let r = HostRegion::open_shm(&shm.0, 1024).unwrap();
        let t = TensorRef {
            region_id: 1,
            offset: 8,
            dtype: DType::Bf16,
            shape: vec![2, 3],
            strides: Some(vec![4, 1]),
        };
        let v = t.resolve(r.size()).unwrap();
        r.write_matrix_f32(&v, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
            .unwrap();
        let mut raw = [0u8; 16];
        r.read_bytes(8, &mut raw).unwrap();
        let vals: Vec<f32> = raw
            .chunks(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(vals, vec![1.0, 2.0, 3.0, 0.0, 4.0, 5.0, 6.0, 0.0]);
    }
}
