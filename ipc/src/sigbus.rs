//! Surviving a client that truncates a by-name region under the daemon.
//!
//! A POSIX shared-memory object cannot be sealed: its owner may `ftruncate`
//! it while the daemon has it mapped, and the next access to a page past
//! the new end raises `SIGBUS`, which would kill the daemon and every other
//! client's work with it. So each by-name mapping is *guarded*: a `SIGBUS`
//! handler looks the faulting address up in a table of guarded ranges and,
//! when it lies in one, maps anonymous zero pages over the whole range
//! (`MAP_FIXED`) and flags it. The faulting access then completes into
//! those pages, and the code that touched the region reads the flag
//! afterwards and fails that request alone (Wayland compositors do the same
//! for client shm pools). A fault anywhere else goes to the handler that was
//! installed before (Rust's stack-overflow reporter) or kills the process
//! as usual.
//!
//! The table is the one global of this crate: a signal handler can reach
//! nothing else. It is a fixed array of slots, each a small seqlock, so the
//! handler reads it without locks or allocation.

use nix::libc;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};

/// Guarded mappings the daemon can hold at once.
pub const SLOTS: usize = 16384;

struct Slot {
    /// Taken by a guard (allocation only; readers go by `seq`).
    taken: AtomicBool,
    /// Seqlock: odd while `start`/`len` are being written.
    seq: AtomicU64,
    start: AtomicUsize,
    /// 0: the slot guards nothing.
    len: AtomicUsize,
    /// Set by the handler once it replaced the range's pages.
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    taken: AtomicBool::new(false),
    seq: AtomicU64::new(0),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    poisoned: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static PREVIOUS: OnceLock<SigAction> = OnceLock::new();

impl Slot {
    fn write(&self, start: usize, len: usize) {
        self.seq.fetch_add(1, Ordering::AcqRel);
        self.start.store(start, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.poisoned.store(false, Ordering::Relaxed);
        self.seq.fetch_add(1, Ordering::Release);
    }

    /// `(start, len)` when stable and in use.
    fn read(&self) -> Option<(usize, usize)> {
        let s1 = self.seq.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            return None;
        }
        let start = self.start.load(Ordering::Relaxed);
        let len = self.len.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == s1 && len > 0).then_some((start, len))
    }
}

/// A guarded range; unguarded when dropped (before its memory is unmapped).
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Guard {
    /// Guards `len` bytes mapped at `start`. `None` when every slot is in
    /// use (the caller refuses the mapping) or the handler could not be
    /// installed.
    pub fn new(start: *const u8, len: usize) -> Option<Guard> {
        install()?;
        let slot = TABLE.iter().position(|s| {
            s.taken
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })?;
        TABLE[slot].write(start as usize, len);
        Some(Guard { slot })
    }

    /// Whether a fault replaced this range's memory with zero pages.
    pub fn poisoned(&self) -> bool {
        TABLE[self.slot].poisoned.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        s.write(0, 0);
        s.taken.store(false, Ordering::Release);
    }
}

fn install() -> Option<()> {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    let ok = *INSTALLED.get_or_init(|| {
        let action = SigAction::new(
            SigHandler::SigAction(on_sigbus),
            SaFlags::SA_SIGINFO | SaFlags::SA_ONSTACK,
            SigSet::empty(),
        );
        // SAFETY: `on_sigbus` only does async-signal-safe work: atomic
        // loads and stores, mmap, sigaction, and calling the handler that
        // was installed before.
        match unsafe { sigaction(Signal::SIGBUS, &action) } {
            Ok(old) => PREVIOUS.set(old).is_ok(),
            Err(_) => false,
        }
    });
    ok.then_some(())
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &TABLE {
        let Some((start, len)) = slot.read() else {
            continue;
        };
        if addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: [start, start+len) is a live mapping of the region that
        // faulted (its owner is the thread that is running this handler);
        // replacing its pages is what the guard exists for.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            slot.poisoned.store(true, Ordering::Release);
            return;
        }
        break;
    }
    chain(sig, info, ctx);
}

/// Not ours: what would have happened without this handler.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    match PREVIOUS.get().map(SigAction::handler) {
        Some(SigHandler::SigAction(f)) => f(sig, info, ctx),
        Some(SigHandler::Handler(f)) => f(sig),
        _ => {
            // Default action: returning re-runs the access, which faults
            // again and now kills the process (with a core dump).
            let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            // SAFETY: restoring the default disposition is always sound.
            let _ = unsafe { sigaction(Signal::SIGBUS, &dfl) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_and_ranges_are_found() {
        let a = Guard::new(0x1000 as *const u8, 0x2000).unwrap();
        let b = Guard::new(0x8000 as *const u8, 0x1000).unwrap();
        assert_ne!(a.slot, b.slot);
        assert_eq!(TABLE[a.slot].read(), Some((0x1000, 0x2000)));
        let freed = a.slot;
        drop(a);
        assert_eq!(TABLE[freed].read(), None);
        assert!(!b.poisoned());
    }
}
