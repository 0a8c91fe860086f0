//! The Prometheus text endpoint (`metrics_addr`, off by default): `GET
//! /metrics` on a loopback address, served by a small tokio runtime on a
//! thread of its own from the shared [`Gauges`], so that scraping never
//! touches the I/O thread or the executor.
//!
//! Rates are left to Prometheus: tokens per second is
//! `rate(tacflow_tokens_total[1m])`, steps per second
//! `rate(tacflow_step_duration_seconds_count[1m])`.

use super::{ServerInfo, Shutdown};
use crate::engine::gauges::{Gauges, STEP_BUCKETS_S};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info};

/// Scrapes served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 16;
/// Largest request head read.
const MAX_REQUEST: usize = 8192;

/// `\`, `"` and newlines escaped, as the text format wants label values.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Everything the endpoint shows, in the Prometheus text format (0.0.4).
pub fn render(info: &ServerInfo, queue_depth: u64) -> String {
    let g: &Gauges = &info.gauges;
    let mut o = String::with_capacity(8192);
    family(
        &mut o,
        "tacflow_info",
        "gauge",
        "The daemon instance, model and backend (always 1).",
    );
    let _ = writeln!(
        o,
        "tacflow_info{{instance_id=\"{}\",model=\"{}\",backend=\"{}\",device=\"{}\",version=\"{}\"}} 1",
        label(&info.instance_id),
        label(&info.model.name),
        label(&info.backend.kind),
        label(&info.backend.device),
        env!("CARGO_PKG_VERSION")
    );
    let simple: [(&str, &str, &str, f64); 11] = [
        (
            "tacflow_uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
            g.start.elapsed().as_secs_f64(),
        ),
        (
            "tacflow_steps_total",
            "counter",
            "Steps that ran to completion.",
            g.steps.load(Relaxed) as f64,
        ),
        (
            "tacflow_kv_blocks_used",
            "gauge",
            "KV cache blocks in use.",
            g.kv_total_blocks
                .load(Relaxed)
                .saturating_sub(g.kv_free_blocks.load(Relaxed)) as f64,
        ),
        (
            "tacflow_kv_blocks_free",
            "gauge",
            "KV cache blocks free.",
            g.kv_free_blocks.load(Relaxed) as f64,
        ),
        (
            "tacflow_sessions",
            "gauge",
            "Live sessions.",
            g.sessions.load(Relaxed) as f64,
        ),
        (
            "tacflow_sequences",
            "gauge",
            "Open sequences.",
            g.sequences.load(Relaxed) as f64,
        ),
        (
            "tacflow_regions",
            "gauge",
            "Registered regions.",
            g.regions.load(Relaxed) as f64,
        ),
        (
            "tacflow_mapped_bytes",
            "gauge",
            "Bytes of client memory mapped.",
            g.mapped_bytes.load(Relaxed) as f64,
        ),
        (
            "tacflow_queue_depth",
            "gauge",
            "Requests waiting for or running on the executor.",
            queue_depth as f64,
        ),
        (
            "tacflow_executor_idle_seconds",
            "gauge",
            "Seconds since the executor last finished a command.",
            g.idle_ms() as f64 / 1e3,
        ),
        (
            "tacflow_kv_block_size_tokens",
            "gauge",
            "Tokens per KV block.",
            f64::from(info.block_size),
        ),
    ];
    for (name, kind, help, v) in simple {
        family(&mut o, name, kind, help);
        let _ = writeln!(o, "{name} {v}");
    }
    family(
        &mut o,
        "tacflow_tokens_total",
        "counter",
        "Tokens run through the model, by phase (rate() gives tokens/s).",
    );
    let _ = writeln!(
        o,
        "tacflow_tokens_total{{phase=\"prefill\"}} {}",
        g.prefill_tokens.load(Relaxed)
    );
    let _ = writeln!(
        o,
        "tacflow_tokens_total{{phase=\"decode\"}} {}",
        g.decode_tokens.load(Relaxed)
    );
    histogram(&mut o, g);
    family(
        &mut o,
        "tacflow_requests_total",
        "counter",
        "Requests received, by kind.",
    );
    for (kind, n) in g.requests_by_kind() {
        let _ = writeln!(o, "tacflow_requests_total{{kind=\"{kind}\"}} {n}");
    }
    family(
        &mut o,
        "tacflow_errors_total",
        "counter",
        "Error replies sent, by code.",
    );
    for (code, n) in g.errors_by_code() {
        let _ = writeln!(o, "tacflow_errors_total{{code=\"{}\"}} {n}", label(&code));
    }
    attention(&mut o, g);
    o
}

fn histogram(o: &mut String, g: &Gauges) {
    let name = "tacflow_step_duration_seconds";
    family(
        o,
        name,
        "histogram",
        "Time successful steps ran on the executor (queue wait excluded).",
    );
    let h = g.step_run.snapshot();
    for (bound, n) in STEP_BUCKETS_S.iter().zip(&h.cumulative) {
        let _ = writeln!(o, "{name}_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "{name}_bucket{{le=\"+Inf\"}} {}",
        h.cumulative.last().unwrap_or(&0)
    );
    let _ = writeln!(o, "{name}_sum {}\n{name}_count {}", h.sum_s, h.count);
}

/// Per attention policy, from the diagnostics sequences report (empty until
/// a sequence with diagnostics decodes).
fn attention(o: &mut String, g: &Gauges) {
    let stats = g.attention.lock().map(|a| a.clone()).unwrap_or_default();
    let rows: [(&str, &str, &str); 4] = [
        (
            "tacflow_attention_decode_steps_total",
            "counter",
            "Decode queries measured, by policy.",
        ),
        (
            "tacflow_attention_tokens_read_fraction",
            "gauge",
            "Mean fraction of the context read per decode query, by policy.",
        ),
        (
            "tacflow_attention_true_mass",
            "gauge",
            "Mean exact attention mass of the selections, by policy.",
        ),
        (
            "tacflow_attention_success_rate",
            "gauge",
            "Fraction of (layer, head) reaching the policy's target mass.",
        ),
    ];
    for (i, (name, kind, help)) in rows.iter().enumerate() {
        family(o, name, kind, help);
        for (policy, s) in &stats {
            let v = [
                s.decode_steps as f64,
                s.tokens_read_fraction,
                s.true_mass,
                s.success_rate,
            ][i];
            let _ = writeln!(o, "{name}{{policy=\"{}\"}} {v}", label(policy));
        }
    }
}

/// Answers one connection: `GET /metrics` → the text, anything else → 404.
async fn answer(mut stream: tokio::net::TcpStream, body: impl FnOnce() -> String) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return;
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let mut words = line.split(|&b| b == b' ');
    let (method, path) = (words.next(), words.next());
    let ok = matches!(method, Some(b"GET")) && matches!(path, Some(b"/metrics" | b"/"));
    let (status, ctype, text) = if ok {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body())
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only GET /metrics is served\n".into(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(text.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Binds `addr` now (so that a taken port fails start-up) and serves it on
/// a thread until `stop`.
pub fn spawn(
    addr: SocketAddr,
    info: ServerInfo,
    queue_depth: Arc<super::executor::Shared>,
    stop: Shutdown,
) -> crate::error::Result<std::thread::JoinHandle<()>> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| crate::error::Error::Config(format!("metrics_addr {addr}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| crate::error::Error::Config(format!("metrics_addr {addr}: {e}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| crate::error::Error::Backend(format!("metrics runtime: {e}")))?;
    info!(address = %addr, "metrics endpoint: GET /metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || rt.block_on(serve(listener, info, queue_depth, stop)))
        .map_err(|e| crate::error::Error::Backend(format!("metrics thread: {e}")))
}

async fn serve(
    listener: std::net::TcpListener,
    info: ServerInfo,
    shared: Arc<super::executor::Shared>,
    stop: Shutdown,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let info = Arc::new(info);
    while !stop.is_triggered() {
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        let Ok(Ok((stream, peer))) = accepted else {
            continue;
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        debug!(%peer, "metrics scrape");
        let (info, shared) = (info.clone(), shared.clone());
        tokio::spawn(async move {
            answer(stream, || render(&info, shared.queue_depth.load(Relaxed))).await;
            drop(permit);
        });
    }
}
