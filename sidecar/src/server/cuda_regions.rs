//! CUDA IPC regions (`PROTOCOL.md` §3.2, kind `cuda`): a client's device
//! allocation, exported with `cuIpcGetMemHandle`, opened once in the
//! daemon's context at `register_region` and closed when the region is
//! unregistered or its session ends (dropping the last [`CudaRegion`]).
//!
//! The driver is behind [`IpcOpener`], so that the descriptor checks, the
//! refusals (a malformed handle, a region larger than its allocation,
//! another device) and the lifecycle run on the CPU against a fake opener
//! in the tests; [`DriverOpener`] is the real one, over the CUDA backend's
//! context (`tacflow_kernels::cuda::ipc`), and [`NoDevice`] the CPU
//! daemon's, which refuses every well-formed descriptor `unsupported`.

use std::sync::Arc;
use tacflow_ipc::{ErrorCode, ErrorReply};

/// The IPC handle size the driver uses for memory and events.
pub const HANDLE_BYTES: usize = 64;

/// What the daemon needs of the CUDA driver to use client memory.
pub trait IpcOpener: Send + Sync + std::fmt::Debug {
    /// The daemon's device (`GPU-…`), or why there is none.
    fn device_uuid(&self) -> Result<String, String>;
    /// Opens a memory handle: the mapping's device pointer and how many
    /// bytes of its allocation lie from there on.
    fn open_mem(&self, handle: &[u8; HANDLE_BYTES]) -> Result<(u64, u64), String>;
    fn close_mem(&self, ptr: u64);
    /// Opens the client's interprocess event.
    fn open_event(&self, handle: &[u8; HANDLE_BYTES]) -> Result<u64, String>;
    /// A new interprocess event of the daemon's, with its handle.
    fn export_event(&self) -> Result<(u64, [u8; HANDLE_BYTES]), String>;
    fn destroy_event(&self, ev: u64);
}

/// A daemon without a GPU: CUDA regions cannot be opened.
#[derive(Debug, Default)]
pub struct NoDevice;

impl IpcOpener for NoDevice {
    fn device_uuid(&self) -> Result<String, String> {
        Err("this daemon runs on the CPU backend: CUDA regions need the CUDA backend".into())
    }
    fn open_mem(&self, _: &[u8; HANDLE_BYTES]) -> Result<(u64, u64), String> {
        Err("no CUDA device".into())
    }
    fn close_mem(&self, _: u64) {}
    fn open_event(&self, _: &[u8; HANDLE_BYTES]) -> Result<u64, String> {
        Err("no CUDA device".into())
    }
    fn export_event(&self) -> Result<(u64, [u8; HANDLE_BYTES]), String> {
        Err("no CUDA device".into())
    }
    fn destroy_event(&self, _: u64) {}
}

/// The driver's IPC calls on the CUDA backend's context.
#[derive(Debug)]
pub struct DriverOpener(pub tacflow_kernels::cuda::ipc::DriverIpc);

impl IpcOpener for DriverOpener {
    fn device_uuid(&self) -> Result<String, String> {
        self.0.device_uuid()
    }
    fn open_mem(&self, handle: &[u8; HANDLE_BYTES]) -> Result<(u64, u64), String> {
        self.0.open_mem(handle)
    }
    fn close_mem(&self, ptr: u64) {
        self.0.close_mem(ptr)
    }
    fn open_event(&self, handle: &[u8; HANDLE_BYTES]) -> Result<u64, String> {
        self.0.open_event(handle)
    }
    fn export_event(&self) -> Result<(u64, [u8; HANDLE_BYTES]), String> {
        self.0.export_event()
    }
    fn destroy_event(&self, ev: u64) {
        self.0.destroy_event(ev)
    }
}

/// A client's device memory, open in the daemon's context until dropped.
#[derive(Debug)]
pub struct CudaRegion {
    opener: Arc<dyn IpcOpener>,
    /// The mapping as opened (the allocation's exported pointer).
    mapped: u64,
    /// The region: `byte_size` bytes from `mapped + offset`.
    pub ptr: u64,
    pub byte_size: u64,
    /// The client's event, waited for before reading its inputs.
    pub client_event: Option<u64>,
    /// The daemon's event, recorded after writing outputs, and its handle.
    pub daemon_event: Option<(u64, [u8; HANDLE_BYTES])>,
}

impl Drop for CudaRegion {
    fn drop(&mut self) {
        if let Some(ev) = self.client_event {
            self.opener.destroy_event(ev);
        }
        if let Some((ev, _)) = self.daemon_event {
            self.opener.destroy_event(ev);
        }
        self.opener.close_mem(self.mapped);
    }
}

/// A CUDA region descriptor, as `register_region` sends it.
#[derive(Debug, Clone, Copy)]
pub struct CudaDesc<'a> {
    pub ipc_handle: &'a [u8],
    pub device_uuid: &'a str,
    pub byte_size: u64,
    pub offset: u64,
    pub event_handle: Option<&'a [u8]>,
}

fn handle<'a>(what: &str, bytes: &'a [u8]) -> Result<&'a [u8; HANDLE_BYTES], ErrorReply> {
    bytes.try_into().map_err(|_| {
        ErrorReply::bad_request(format!(
            "{what} must be {HANDLE_BYTES} bytes (a CUDA IPC handle), got {}",
            bytes.len()
        ))
        .with("bytes", bytes.len())
    })
}

/// Checks a descriptor and opens it. Nothing stays open when it is
/// refused: the descriptor is checked first, the device next, and a
/// mapping or event opened before a later refusal is closed again.
pub fn open(opener: &Arc<dyn IpcOpener>, d: CudaDesc<'_>) -> Result<CudaRegion, ErrorReply> {
    let mem = handle("ipc_handle", d.ipc_handle)?;
    let ev = d
        .event_handle
        .map(|e| handle("event_handle", e))
        .transpose()?;
    if d.byte_size == 0 {
        return Err(ErrorReply::bad_request(
            "a region must have a byte_size above 0",
        ));
    }
    let end = d
        .offset
        .checked_add(d.byte_size)
        .ok_or_else(|| ErrorReply::new(ErrorCode::OutOfBounds, "offset + byte_size overflows"))?;
    let ours = opener
        .device_uuid()
        .map_err(|why| ErrorReply::new(ErrorCode::Unsupported, why))?;
    if !d.device_uuid.eq_ignore_ascii_case(&ours) {
        return Err(ErrorReply::bad_request(format!(
            "the region lives on device {}, the daemon runs on {ours}",
            d.device_uuid
        )));
    }
    let (mapped, size) = opener.open_mem(mem).map_err(|why| {
        ErrorReply::bad_request(format!("the daemon cannot open ipc_handle: {why}"))
    })?;
    let mut region = CudaRegion {
        opener: opener.clone(),
        mapped,
        ptr: mapped + d.offset,
        byte_size: d.byte_size,
        client_event: None,
        daemon_event: None,
    };
    if end > size {
        return Err(ErrorReply::new(
            ErrorCode::OutOfBounds,
            format!(
                "offset {} + byte_size {} exceed the {size} bytes of the exported allocation",
                d.offset, d.byte_size
            ),
        )
        .with("allocation_bytes", size));
    }
    if let Some(ev) = ev {
        region.client_event = Some(opener.open_event(ev).map_err(|why| {
            ErrorReply::bad_request(format!("the daemon cannot open event_handle: {why}"))
        })?);
        region.daemon_event =
            Some(opener.export_event().map_err(|why| {
                ErrorReply::internal(format!("exporting the daemon's event: {why}"))
            })?);
    }
    Ok(region)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what is open; allocations are `size` bytes.
    #[derive(Debug, Default)]
    struct Fake {
        size: u64,
        open: Mutex<Vec<String>>,
        fail_events: bool,
    }

    const UUID: &str = "GPU-00000000-1111-2222-3333-444444444444";

    impl IpcOpener for Fake {
        fn device_uuid(&self) -> Result<String, String> {
            Ok(UUID.into())
        }
        fn open_mem(&self, h: &[u8; HANDLE_BYTES]) -> Result<(u64, u64), String> {
            if h[0] == 0xff {
                return Err("CUDA_ERROR_INVALID_VALUE".into());
            }
            self.open.lock().unwrap().push(format!("mem {}", h[0]));
            Ok((0x1000 * u64::from(h[0] + 1), self.size))
        }
        fn close_mem(&self, ptr: u64) {
            let name = format!("mem {}", ptr / 0x1000 - 1);
            let mut o = self.open.lock().unwrap();
            let i = o.iter().position(|x| *x == name).expect("closed once");
            o.remove(i);
        }
        fn open_event(&self, h: &[u8; HANDLE_BYTES]) -> Result<u64, String> {
            if self.fail_events {
                return Err("CUDA_ERROR_INVALID_HANDLE".into());
            }
            self.open.lock().unwrap().push(format!("event {}", h[0]));
            Ok(u64::from(h[0]))
        }
        fn export_event(&self) -> Result<(u64, [u8; HANDLE_BYTES]), String> {
            self.open.lock().unwrap().push("event 200".into());
            Ok((200, [7; HANDLE_BYTES]))
        }
        fn destroy_event(&self, ev: u64) {
            let name = format!("event {ev}");
            let mut o = self.open.lock().unwrap();
            let i = o.iter().position(|x| *x == name).expect("destroyed once");
            o.remove(i);
        }
    }

    fn desc<'a>(mem: &'a [u8], ev: Option<&'a [u8]>, offset: u64, size: u64) -> CudaDesc<'a> {
        CudaDesc {
            ipc_handle: mem,
            device_uuid: UUID,
            byte_size: size,
            offset,
            event_handle: ev,
        }
    }

    #[test]
    fn a_region_is_open_until_dropped() {
        let fake = Arc::new(Fake {
            size: 1 << 20,
            ..Fake::default()
        });
        let opener: Arc<dyn IpcOpener> = fake.clone();
        let (mem, ev) = ([3u8; 64], [9u8; 64]);
        let r = open(&opener, desc(&mem, Some(&ev), 4096, 8192)).unwrap();
        assert_eq!(r.ptr, 0x4000 + 4096);
        assert_eq!(r.daemon_event.unwrap().1, [7; 64]);
        assert_eq!(fake.open.lock().unwrap().len(), 3);
        drop(r);
        assert!(
            fake.open.lock().unwrap().is_empty(),
            "unregister closes all"
        );
    }

    #[test]
    fn refusals_leave_nothing_open() {
        let fake = Arc::new(Fake {
            size: 4096,
            ..Fake::default()
        });
        let opener: Arc<dyn IpcOpener> = fake.clone();
        let mem = [1u8; 64];
        let cases: Vec<(ErrorCode, CudaDesc<'_>)> = vec![
            (ErrorCode::BadRequest, desc(&mem[..63], None, 0, 16)),
            (ErrorCode::BadRequest, desc(&mem, Some(&mem[..8]), 0, 16)),
            (ErrorCode::BadRequest, desc(&mem, None, 0, 0)),
            (ErrorCode::OutOfBounds, desc(&mem, None, u64::MAX, 16)),
            (ErrorCode::OutOfBounds, desc(&mem, None, 4000, 200)),
            (ErrorCode::BadRequest, desc(&[0xff; 64], None, 0, 16)),
            (
                ErrorCode::BadRequest,
                CudaDesc {
                    device_uuid: "GPU-ffffffff-1111-2222-3333-444444444444",
                    ..desc(&mem, None, 0, 16)
                },
            ),
        ];
        for (i, (code, d)) in cases.into_iter().enumerate() {
            let e = open(&opener, d).unwrap_err();
            assert_eq!(e.code, code, "case {i}: {}", e.message);
            assert!(
                fake.open.lock().unwrap().is_empty(),
                "case {i} left something open"
            );
        }
        let bad_events: Arc<dyn IpcOpener> = Arc::new(Fake {
            size: 4096,
            fail_events: true,
            ..Fake::default()
        });
        let e = open(&bad_events, desc(&mem, Some(&mem), 0, 16)).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    #[test]
    fn a_daemon_without_a_gpu_refuses_well_formed_descriptors() {
        let opener: Arc<dyn IpcOpener> = Arc::new(NoDevice);
        let mem = [1u8; 64];
        assert_eq!(
            open(&opener, desc(&mem, None, 0, 16)).unwrap_err().code,
            ErrorCode::Unsupported
        );
        assert_eq!(
            open(&opener, desc(&mem[..3], None, 0, 16))
                .unwrap_err()
                .code,
            ErrorCode::BadRequest,
            "a malformed descriptor is bad whatever the device"
        );
    }
}
