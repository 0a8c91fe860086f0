//! systemd integration (`Type=notify`): READY once the model is loaded and
//! warmed up and the socket accepts clients, STATUS lines, STOPPING at
//! shutdown, and WATCHDOG pings driven by the executor loop.
//!
//! The executor sends the pings (see [`Heartbeat`]), not a timer thread: a
//! step that never ends stops them, and systemd then restarts the daemon
//! (`WatchdogSec=`). Outside systemd (`NOTIFY_SOCKET` unset) all of this
//! costs one branch per command.

use crate::engine::gauges::Gauges;
use sd_notify::NotifyState;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tracing::{Level, debug};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

/// How often STATUS is refreshed when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Sends `sd_notify` messages when the daemon runs under a service manager.
#[derive(Debug, Clone)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()),
        }
    }

    /// A notifier that never sends (tests, embedded servers).
    pub fn disabled() -> Notifier {
        Notifier { enabled: false }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        // `false`: never touch the environment (other threads may read it).
        if let Err(e) = sd_notify::notify(false, states) {
            debug!(cause = %e, "sd_notify failed");
        }
    }

    pub fn status(&self, text: &str) {
        self.send(&[NotifyState::Status(text)]);
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: finishing the step in flight"),
        ]);
    }

    /// A fatal fault: the daemon answers what waits and exits soon.
    pub fn failing(&self, why: &str) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status(&format!("failing: {why}")),
        ]);
    }

    /// The daemon exits on an error: the last STATUS says which.
    pub fn exiting(&self, why: &str) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status(&format!("exiting: {why}")),
        ]);
    }

    fn watchdog(&self, status: &str) {
        self.send(&[NotifyState::Watchdog, NotifyState::Status(status)]);
    }
}

/// The watchdog period systemd asks for (`WATCHDOG_USEC`), when it names
/// this process (`WATCHDOG_PID` absent or equal to our pid, as
/// `sd_watchdog_enabled(3)` reads them).
pub fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok()? != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The one-line summary shown by `systemctl status`.
pub fn serving_status(g: &Gauges) -> String {
    let total = g.kv_total_blocks.load(Relaxed);
    let used = total.saturating_sub(g.kv_free_blocks.load(Relaxed));
    format!(
        "serving: {} sessions, {} sequences, {} steps, KV {used}/{total} blocks used",
        g.sessions.load(Relaxed),
        g.sequences.load(Relaxed),
        g.steps.load(Relaxed),
    )
}

/// The executor's pulse: pings the watchdog and refreshes STATUS at half
/// the watchdog period (or every few seconds without a watchdog).
#[derive(Debug)]
pub struct Heartbeat {
    notifier: Notifier,
    watchdog: bool,
    every: Duration,
    next: Instant,
    gauges: Arc<Gauges>,
}

impl Heartbeat {
    pub fn new(notifier: Notifier, watchdog: Option<Duration>, gauges: Arc<Gauges>) -> Heartbeat {
        let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).max(Duration::from_millis(1)));
        Heartbeat {
            watchdog: watchdog.is_some() && notifier.enabled(),
            notifier,
            every,
            next: Instant::now(),
            gauges,
        }
    }

    /// How long the executor may sleep waiting for work before the next
    /// beat is due; `None` when nothing listens (sleep as long as needed).
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.notifier.enabled().then(|| {
            self.next
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        })
    }

    /// Beats if one is due. Called after every command and when the idle
    /// wait times out.
    #[inline]
    pub fn tick(&mut self) {
        if !self.notifier.enabled() {
            return;
        }
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next = now + self.every;
        let status = serving_status(&self.gauges);
        if self.watchdog {
            self.notifier.watchdog(&status);
        } else {
            self.notifier.status(&status);
        }
    }
}

/// Log lines for the journal: a syslog priority prefix (`<3>` error … `<7>`
/// debug), which journald reads from a service's stderr and strips, then
/// the line without timestamp or colours (journald adds its own). Wraps the
/// plain formatter.
#[derive(Debug)]
pub struct JournalFormat<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for JournalFormat<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        write!(w, "<{priority}>")?;
        self.0.format_event(ctx, w, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_counts() {
        let g = Gauges::default();
        g.set_kv(100, 90);
        g.sessions.store(2, Relaxed);
        g.set_sequences(3);
        assert_eq!(
            serving_status(&g),
            "serving: 2 sessions, 3 sequences, 0 steps, KV 10/100 blocks used"
        );
    }

    #[test]
    fn a_disabled_heartbeat_never_times_out() {
        let hb = Heartbeat::new(
            Notifier::disabled(),
            Some(Duration::from_secs(1)),
            Arc::default(),
        );
        assert_eq!(hb.idle_timeout(), None);
        assert!(!hb.watchdog);
    }
}
