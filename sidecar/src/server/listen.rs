//! Where clients reach the daemon: the ZeroMQ socket file, the companion
//! descriptor socket beside it (`PROTOCOL.md` §3.4), an optional TCP
//! address, or the sockets systemd passes (socket activation).
//!
//! The daemon makes its Unix sockets itself and hands the stream one to
//! ZeroMQ (`ZMQ_USE_FD`): bound under a temporary name, given its mode and
//! group, then renamed into place, so that no client can connect while the
//! file still has the umask's mode. Under socket activation systemd made
//! them (`SocketMode=`, `SocketGroup=`) and the same `ZMQ_USE_FD` adopts
//! them; the daemon then leaves the files alone at exit, since systemd
//! keeps listening on them.

use crate::config::Config;
use crate::error::{Error, Result};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrLike, SockaddrStorage, UnixAddr, bind,
    getsockname, getsockopt, listen, socket, sockopt,
};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// The sockets of one daemon, before ZeroMQ and the companion thread take
/// them.
#[derive(Debug)]
pub struct Listeners {
    /// The Unix socket path ZeroMQ clients connect to.
    pub path: PathBuf,
    /// The companion socket for descriptors.
    pub fd_path: PathBuf,
    /// Bound, listening, non-blocking `SOCK_SEQPACKET` socket at `fd_path`.
    pub fd_listener: Option<OwnedFd>,
    /// Bound, listening stream socket at `path`, for ZeroMQ.
    stream: Option<OwnedFd>,
    /// A TCP socket systemd passed.
    tcp: Option<(OwnedFd, SocketAddr)>,
    /// systemd made the socket files and keeps them.
    pub activated: bool,
}

/// `tacflowd.sock` → `tacflowd.fd.sock` (any `X.sock` → `X.fd.sock`).
pub fn companion_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or("tacflowd".into(), |n| n.to_string_lossy().into_owned());
    let stem = name.strip_suffix(".sock").unwrap_or(&name);
    path.with_file_name(format!("{stem}.fd.sock"))
}

impl Listeners {
    /// Takes the sockets systemd passed, or makes them.
    pub fn prepare(config: &Config) -> Result<Listeners> {
        let passed: Vec<RawFd> = sd_notify::listen_fds_with_names(false)
            .map_err(|e| Error::Config(format!("socket activation: {e}")))?
            .map(|(fd, _)| fd)
            .collect();
        if !passed.is_empty() {
            return Self::adopt(passed, config);
        }
        let path = config.socket_path();
        let fd_path = companion_path(&path);
        let group = config.socket_group.as_deref();
        prepare_socket_path(&path)?;
        prepare_socket_path(&fd_path)?;
        let stream = bind_unix(&path, SockType::Stream, group)?;
        let fd_listener = bind_unix(&fd_path, SockType::SeqPacket, group)?;
        Ok(Listeners {
            path,
            fd_path,
            fd_listener: Some(fd_listener),
            stream: Some(stream),
            tcp: None,
            activated: false,
        })
    }

    /// Socket activation: sorts the passed sockets by family and type.
    fn adopt(passed: Vec<RawFd>, config: &Config) -> Result<Listeners> {
        let (mut stream, mut seqpacket, mut tcp) = (None, None, None);
        for raw in passed {
            // SAFETY: systemd passed these descriptors to this process
            // (LISTEN_PID matched); nothing else owns them.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let ty = getsockopt(&fd, sockopt::SockType).map_err(|e| sys("SO_TYPE", e))?;
            let addr: SockaddrStorage = getsockname(raw).map_err(|e| sys("getsockname", e))?;
            match (
                addr.family(),
                ty,
                addr.as_unix_addr().and_then(UnixAddr::path),
            ) {
                (Some(AddressFamily::Unix), SockType::Stream, Some(p)) => {
                    stream = Some((fd, p.to_owned()))
                }
                (Some(AddressFamily::Unix), SockType::SeqPacket, Some(p)) => {
                    seqpacket = Some((fd, p.to_owned()))
                }
                (Some(AddressFamily::Inet | AddressFamily::Inet6), SockType::Stream, _) => {
                    let l = std::net::TcpListener::from(fd);
                    let a = l
                        .local_addr()
                        .map_err(|e| Error::Config(format!("passed TCP socket: {e}")))?;
                    tcp = Some((OwnedFd::from(l), a));
                }
                other => {
                    return Err(Error::Config(format!(
                        "socket activation: cannot serve a passed socket of family/type {:?}/{:?}",
                        other.0, other.1
                    )));
                }
            }
        }
        let Some((stream, path)) = stream else {
            return Err(Error::Config(
                "socket activation: no Unix stream socket among the passed sockets (ListenStream=)"
                    .into(),
            ));
        };
        if config.socket.as_ref().is_some_and(|s| *s != path) {
            warn!(socket = %path.display(), "socket activation: using the passed socket, not the configured path");
        }
        let (fd_listener, fd_path) = match seqpacket {
            Some((fd, p)) => (fd, p),
            None => {
                let p = companion_path(&path);
                prepare_socket_path(&p)?;
                (
                    bind_unix(&p, SockType::SeqPacket, config.socket_group.as_deref())?,
                    p,
                )
            }
        };
        set_nonblocking(&fd_listener)?;
        info!(socket = %path.display(), companion = %fd_path.display(), tcp = ?tcp.as_ref().map(|t| t.1), "socket activation");
        Ok(Listeners {
            path,
            fd_path,
            fd_listener: Some(fd_listener),
            stream: Some(stream),
            tcp,
            activated: true,
        })
    }

    /// Binds the ROUTER: the Unix socket (adopted), then TCP if any.
    pub fn bind_router(&mut self, router: &mut zmq::Socket, config: &Config) -> Result<()> {
        if let Some(fd) = self.stream.take() {
            adopt_fd(router, fd, &format!("ipc://{}", self.path.display()))?;
        }
        if let Some((fd, addr)) = self.tcp.take() {
            adopt_fd(router, fd, &format!("tcp://{addr}"))?;
            warn!(address = %addr, "TCP listener (passed by systemd) is unauthenticated");
        } else if let Some(addr) = config.tcp_addr()? {
            router.bind(&format!("tcp://{addr}"))?;
            warn!(address = %addr, "TCP listener is unauthenticated: anyone who reaches it can use the daemon");
        }
        Ok(())
    }

    /// Removes the socket files the daemon made (not systemd's).
    pub fn remove_files(&self) {
        if !self.activated {
            let _ = std::fs::remove_file(&self.path);
            let _ = std::fs::remove_file(&self.fd_path);
        }
    }
}

fn sys(op: &str, e: nix::errno::Errno) -> Error {
    Error::Config(format!("{op}: {e}"))
}

fn set_nonblocking(fd: &OwnedFd) -> Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| sys("F_GETFL", e))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(|e| sys("F_SETFL", e))?;
    Ok(())
}

/// Hands a bound, listening socket to ZeroMQ (`ZMQ_USE_FD`, which the
/// `zmq` crate does not wrap); ZeroMQ owns and closes it from then on.
fn adopt_fd(router: &mut zmq::Socket, fd: OwnedFd, endpoint: &str) -> Result<()> {
    set_nonblocking(&fd)?;
    let raw = fd.into_raw_fd();
    set_use_fd(router, raw)?;
    let bound = router.bind(endpoint);
    set_use_fd(router, -1)?;
    if let Err(e) = bound {
        // SAFETY: ZeroMQ refused it, so the descriptor is still ours alone.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
        return Err(e.into());
    }
    Ok(())
}

fn set_use_fd(router: &mut zmq::Socket, fd: RawFd) -> Result<()> {
    let value: std::ffi::c_int = fd;
    // SAFETY: the socket pointer is live for `router`'s lifetime, and
    // ZMQ_USE_FD reads exactly one c_int from the pointer we pass.
    let rc = unsafe {
        zmq_sys::zmq_setsockopt(
            router.as_mut_ptr(),
            zmq_sys::ZMQ_USE_FD as std::ffi::c_int,
            (&value as *const std::ffi::c_int).cast(),
            std::mem::size_of::<std::ffi::c_int>(),
        )
    };
    if rc != 0 {
        return Err(zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() }).into());
    }
    Ok(())
}

/// Refuses a socket path that another live daemon serves. Asked before
/// the model is loaded, so that a second daemon on the same path is turned
/// away at once rather than after its load; `prepare` asks again when it
/// binds. Sockets passed by systemd are the daemon's own: not asked.
pub fn check_not_served(config: &Config) -> Result<()> {
    if std::env::var_os("LISTEN_FDS").is_some() {
        return Ok(());
    }
    let path = config.socket_path();
    refuse_live(&companion_path(&path))?;
    refuse_live(&path)
}

fn refuse_live(path: &Path) -> Result<()> {
    if path.symlink_metadata().is_err() {
        return Ok(());
    }
    // A live socket of another type answers EPROTOTYPE; a stale file
    // ECONNREFUSED.
    let live = match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => true,
        Err(e) => e.raw_os_error() == Some(nix::libc::EPROTOTYPE),
    };
    if live {
        return Err(Error::Config(format!(
            "{}: another daemon is listening there",
            path.display()
        )));
    }
    Ok(())
}

/// Creates the socket's folder (private when the daemon makes it) and clears
/// a stale socket file; refuses to steal the path of a live daemon.
fn prepare_socket_path(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(dir, e))?;
    }
    if path.symlink_metadata().is_ok() {
        refuse_live(path)?;
        warn!(path = %path.display(), "removing a stale socket file");
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// Mode 0600, or 0660 with `group`.
fn socket_mode(path: &Path, group: Option<&str>) -> Result<()> {
    let mode = match group {
        None => 0o600,
        Some(g) => {
            let grp = nix::unistd::Group::from_name(g)
                .map_err(|e| Error::Config(format!("group {g}: {e}")))?
                .ok_or_else(|| Error::Config(format!("group {g} does not exist")))?;
            nix::unistd::chown(path, None, Some(grp.gid)).map_err(|e| Error::io(path, e.into()))?;
            0o660
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(path, e))
}

/// A listening Unix socket at `path` with its final mode from the start:
/// bound under a temporary name in the same folder, then renamed.
fn bind_unix(path: &Path, ty: SockType, group: Option<&str>) -> Result<OwnedFd> {
    let tmp = path.with_file_name(format!(".tacflowd-{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = socket(AddressFamily::Unix, ty, flags, None).map_err(|e| sys("socket", e))?;
    let addr = UnixAddr::new(&tmp).map_err(|e| {
        Error::Config(format!(
            "{}: not usable as a socket path: {e}",
            path.display()
        ))
    })?;
    let made = bind(fd.as_raw_fd(), &addr)
        .map_err(|e| Error::io(&tmp, e.into()))
        .and_then(|()| socket_mode(&tmp, group))
        .and_then(|()| {
            listen(&fd, Backlog::new(1024).expect("a valid backlog"))
                .map_err(|e| Error::io(&tmp, e.into()))
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made.map(|()| fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn companion_sits_beside_the_socket() {
        assert_eq!(
            companion_path(Path::new("/run/tacflow/tacflowd.sock")),
            Path::new("/run/tacflow/tacflowd.fd.sock")
        );
        assert_eq!(
            companion_path(Path::new("/tmp/x")),
            Path::new("/tmp/x.fd.sock")
        );
    }

    #[test]
    fn sockets_are_private_by_default_and_stale_files_go() {
        let dir = std::env::temp_dir().join(format!("tacflow-listen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("t.sock");
        prepare_socket_path(&path).unwrap();
        let fd = bind_unix(&path, SockType::SeqPacket, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // A live listener is not stolen; a dead one is replaced.
        assert!(prepare_socket_path(&path).is_err());
        drop(fd);
        prepare_socket_path(&path).unwrap();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
