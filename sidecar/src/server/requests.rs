//! The requests the I/O thread answers itself: `hello`, `stats`, `health`,
//! region (un)registration, and the checks that turn a `step` into work for
//! the executor.

use super::cuda_regions::{self, CudaDesc};
use super::io::{Io, Reply};
use crate::engine::step::{LogitsTarget, StepWork};
use crate::offload::step::{AttentionWork, TensorTarget};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tacflow_ipc::codec::encode_reply;
use tacflow_ipc::*;
use tracing::{debug, info, warn};

fn unknown_region(region_id: u64) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::UnknownRegion,
        format!("region {region_id} is not registered"),
    )
    .with("region_id", region_id)
}

impl Io {
    pub(super) fn hello(&mut self, h: &HelloRequest, now: Instant) -> Reply {
        let peer_uid = self.current_peer_uid();
        let (session, id) = self.sessions.open(h.client.clone(), peer_uid, now);
        if let Ok(s) = self.sessions.touch(&session, now) {
            s.minor = h.protocol.1;
        }
        self.fds.session_opened(session, id);
        self.publish_sessions();
        info!(session = id, client = %h.client, peer_uid = ?peer_uid, "session opened");
        let mut region_kinds = vec![];
        if peer_uid == Some(self.uid) {
            region_kinds.push("shm".to_owned());
        }
        region_kinds.push("memfd".to_owned());
        let g = &self.info.gauges;
        let l = &self.config.limits;
        Ok(encode_reply(
            Kind::Hello,
            &HelloReply {
                request_id: h.request_id,
                session,
                instance_id: self.info.instance_id.clone(),
                protocol: PROTOCOL_VERSION,
                daemon: format!("tacflowd {}", env!("CARGO_PKG_VERSION")),
                model: self.info.model.clone(),
                backend: self.info.backend.clone(),
                kv: KvInfo {
                    block_size: self.info.block_size,
                    total_blocks: g.kv_total_blocks.load(Relaxed),
                    free_blocks: g.kv_free_blocks.load(Relaxed),
                },
                attention_policies: self.info.policies.clone(),
                lease_ms: self.sessions.lease().as_millis() as u64,
                limits: Limits {
                    max_sequences: l.max_sequences,
                    max_regions: l.max_regions,
                    max_mapped_bytes: l.max_mapped_bytes,
                    max_queued_requests: l.max_queued_requests,
                    max_step_tokens: l.max_step_tokens,
                },
                region_kinds,
                fd_socket: Some(self.info.fd_socket.clone()),
                attention_pool: Some(self.pool_info()),
            },
        ))
    }

    /// Maps a region for the session: by name only for a peer with the
    /// daemon's uid, by memfd for anyone.
    pub(super) fn register(
        &mut self,
        token: &SessionToken,
        rid: u64,
        desc: RegionDesc,
        kind: Kind,
    ) -> Reply {
        let limits = self.config.limits.clone();
        let s = self.sessions.touch(token, Instant::now())?;
        let (sid, peer_uid) = (s.id, s.peer_uid);
        if (s.regions.len() + s.cuda_regions.len()) as u64 >= limits.max_regions {
            return Err(ErrorReply::new(
                ErrorCode::LimitExceeded,
                "too many regions in this session",
            )
            .with("max_regions", limits.max_regions));
        }
        let byte_size = match &desc {
            RegionDesc::Shm { byte_size, .. } | RegionDesc::Memfd { byte_size, .. } => *byte_size,
            RegionDesc::Cuda { .. } => return self.register_cuda(token, rid, &desc, kind),
        };
        if s.mapped_bytes.saturating_add(byte_size) > limits.max_mapped_bytes {
            return Err(ErrorReply::new(
                ErrorCode::LimitExceeded,
                "too many bytes mapped for this session",
            )
            .with("mapped_bytes", s.mapped_bytes)
            .with("max_mapped_bytes", limits.max_mapped_bytes));
        }
        let region = match desc {
            RegionDesc::Shm { name, byte_size } => self.map_by_name(&name, byte_size, peer_uid)?,
            RegionDesc::Memfd {
                fd_token,
                byte_size,
            } => {
                let p = self.fds.take(sid, fd_token).ok_or_else(|| {
                    ErrorReply::new(
                        ErrorCode::UnknownRegion,
                        format!(
                            "no memfd waits under fd_token {fd_token} in this session \
                             (send it on the companion socket first; it waits one lease)"
                        ),
                    )
                    .with("fd_token", fd_token)
                })?;
                debug!(session = sid, peer_uid = p.peer_uid, "memfd region");
                HostRegion::from_fd(p.fd, byte_size, format!("memfd {fd_token:x}"))
                    .map_err(ipc_reply)?
            }
            RegionDesc::Cuda { .. } => unreachable!("refused above"),
        };
        let region_id = self.sessions.new_region_id();
        let s = self.sessions.touch(token, Instant::now())?;
        s.mapped_bytes += byte_size;
        s.regions.insert(region_id, Arc::new(region));
        debug!(session = s.id, region_id, byte_size, "region registered");
        self.publish_sessions();
        Ok(encode_reply(
            kind,
            &RegisterRegionReply {
                request_id: rid,
                region_id,
                byte_size,
                event_handle: None,
            },
        ))
    }

    /// Opens a CUDA region in the daemon's context (`cuda_regions.rs`); it
    /// counts against the session's regions, not its mapped host bytes.
    fn register_cuda(
        &mut self,
        token: &SessionToken,
        rid: u64,
        desc: &RegionDesc,
        kind: Kind,
    ) -> Reply {
        let RegionDesc::Cuda {
            ipc_handle,
            device_uuid,
            byte_size,
            offset,
            event_handle,
        } = desc
        else {
            unreachable!("called for CUDA regions")
        };
        let d = CudaDesc {
            ipc_handle,
            device_uuid,
            byte_size: *byte_size,
            offset: *offset,
            event_handle: event_handle.as_deref(),
        };
        let region = cuda_regions::open(&self.info.cuda_ipc, d)?;
        let event_handle = region.daemon_event.map(|(_, h)| h.to_vec());
        let region_id = self.sessions.new_region_id();
        let s = self.sessions.touch(token, Instant::now())?;
        s.cuda_regions.insert(region_id, Arc::new(region));
        debug!(
            session = s.id,
            region_id, byte_size, "CUDA region registered"
        );
        self.publish_sessions();
        Ok(encode_reply(
            kind,
            &RegisterRegionReply {
                request_id: rid,
                region_id,
                byte_size: *byte_size,
                event_handle,
            },
        ))
    }

    fn map_by_name(
        &mut self,
        name: &str,
        byte_size: u64,
        peer_uid: Option<u32>,
    ) -> Result<HostRegion, ErrorReply> {
        let uid = self.uid;
        if peer_uid != Some(uid) {
            let who = match peer_uid {
                Some(p) => format!("this session's peer has uid {p}, the daemon runs as uid {uid}"),
                None => "this session's peer has no credentials (TCP, or a libzmq without \
                         SO_PEERCRED)"
                    .to_owned(),
            };
            return Err(ErrorReply::new(
                ErrorCode::PermissionDenied,
                format!(
                    "regions by name are accepted only from the daemon's own user: {who}; pass a sealed memfd (kind memfd) instead"
                ),
            ));
        }
        let region = HostRegion::open_shm(name, byte_size).map_err(ipc_reply)?;
        if region.owner_uid() != uid {
            return Err(ErrorReply::new(
                ErrorCode::PermissionDenied,
                format!(
                    "shared memory {name} belongs to uid {}, not the daemon's uid {uid}; pass a sealed memfd instead",
                    region.owner_uid()
                ),
            ));
        }
        Ok(region)
    }

    pub(super) fn unregister(
        &mut self,
        token: &SessionToken,
        region_id: u64,
        now: Instant,
    ) -> Result<(), ErrorReply> {
        let s = self.sessions.touch(token, now)?;
        if s.cuda_regions.remove(&region_id).is_some() {
            // Closed in the daemon's context once no request holds it.
            self.publish_sessions();
            return Ok(());
        }
        let region = s
            .regions
            .remove(&region_id)
            .ok_or_else(|| unknown_region(region_id))?;
        s.mapped_bytes -= region.size();
        self.publish_sessions();
        Ok(())
    }

    /// Checks a step's limits and resolves its logits targets.
    pub(super) fn prepare_step(
        &mut self,
        token: &SessionToken,
        r: StepRequest,
    ) -> Result<StepWork, ErrorReply> {
        let total: u64 = r.entries.iter().map(|e| e.tokens.len() as u64).sum();
        let max = self.config.limits.max_step_tokens;
        if total > max {
            return Err(ErrorReply::new(
                ErrorCode::LimitExceeded,
                format!("step has {total} tokens, the limit is {max}"),
            )
            .with("max_step_tokens", max));
        }
        let vocab = u64::from(self.info.model.vocab_size);
        let s = self.sessions.touch(token, Instant::now())?;
        let mut logits = Vec::with_capacity(r.entries.len());
        for (i, e) in r.entries.iter().enumerate() {
            let Some(t) = &e.logits else {
                logits.push(None);
                continue;
            };
            let at = |err: ErrorReply| {
                let msg = format!("entry {i} logits: {}", err.message);
                ErrorReply {
                    message: msg,
                    ..err
                }
                .with("entry", i)
            };
            let region = s
                .regions
                .get(&t.region_id)
                .ok_or_else(|| at(unknown_region(t.region_id)))?;
            if region.is_poisoned() {
                return Err(at(region.poisoned_error()));
            }
            let view = t.resolve(region.size()).map_err(at)?;
            view.expect_dtype("logits", &[DType::F32, DType::F16, DType::Bf16])
                .map_err(at)?;
            view.expect_shape("logits", &[e.tokens.len() as u64, vocab])
                .map_err(at)?;
            logits.push(Some(LogitsTarget {
                region: region.clone(),
                view,
            }));
        }
        Ok(StepWork {
            session: s.id,
            entries: r.entries,
            logits,
        })
    }

    pub(super) fn stats(&self, rid: u64) -> StatsReply {
        let g = &self.info.gauges;
        StatsReply {
            request_id: rid,
            instance_id: self.info.instance_id.clone(),
            uptime_s: g.start.elapsed().as_secs_f64(),
            steps: g.steps.load(Relaxed),
            prefill_tokens: g.prefill_tokens.load(Relaxed),
            decode_tokens: g.decode_tokens.load(Relaxed),
            sessions: self.sessions.len() as u64,
            sequences: g.sequences.load(Relaxed),
            regions: self.sessions.total_regions() as u64,
            kv_total_blocks: g.kv_total_blocks.load(Relaxed),
            kv_free_blocks: g.kv_free_blocks.load(Relaxed),
            queue_depth: self.shared.queue_depth.load(Relaxed),
            errors: g.errors_by_code(),
            attention: g.attention.lock().map(|a| a.clone()).unwrap_or_default(),
            attention_pool: Some(self.pool_info()),
        }
    }

    fn pool_info(&self) -> AttentionPoolInfo {
        let g = &self.info.gauges;
        g.attention_pool
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    /// Checks an `attention_step`'s row counts and limits and resolves its
    /// four tensors (registered, in bounds, a float dtype, rank 3, one row
    /// per new token); the executor checks the rest against the layout.
    pub(super) fn prepare_attention(
        &mut self,
        token: &SessionToken,
        r: AttentionStepRequest,
    ) -> Result<AttentionWork, ErrorReply> {
        let n = r.seq_ids.len();
        if !r.num_tokens.is_empty() && r.num_tokens.len() != n {
            return Err(ErrorReply::new(
                ErrorCode::ShapeMismatch,
                format!("{} row counts for {n} sequences", r.num_tokens.len()),
            ));
        }
        if !r.positions.is_empty() && r.positions.len() != n {
            return Err(ErrorReply::new(
                ErrorCode::ShapeMismatch,
                format!("{} positions for {n} sequences", r.positions.len()),
            ));
        }
        let rows: Vec<usize> = if r.num_tokens.is_empty() {
            vec![1; n]
        } else {
            r.num_tokens.iter().map(|&x| x as usize).collect()
        };
        if let Some(i) = rows.iter().position(|&x| x == 0) {
            return Err(
                ErrorReply::bad_request(format!("sequence {i} of the batch has no rows"))
                    .with("index", i),
            );
        }
        let total: u64 = rows.iter().map(|&x| x as u64).sum();
        let max = self.config.limits.max_step_tokens;
        if total > max {
            return Err(ErrorReply::new(
                ErrorCode::LimitExceeded,
                format!("attention_step has {total} rows, the limit is {max}"),
            )
            .with("max_step_tokens", max));
        }
        let s = self.sessions.touch(token, Instant::now())?;
        let resolve = |what: &str, t: &TensorRef| -> Result<TensorTarget, ErrorReply> {
            let at = |err: ErrorReply| ErrorReply {
                message: format!("{what}: {}", err.message),
                ..err
            };
            if s.cuda_regions.contains_key(&t.region_id) {
                return Err(ErrorReply::new(
                    ErrorCode::Unsupported,
                    format!(
                        "{what}: region {} is CUDA memory; attention_step reads and writes host \
                         regions in this build (the attention pool is in host memory)",
                        t.region_id
                    ),
                ));
            }
            let region = s
                .regions
                .get(&t.region_id)
                .ok_or_else(|| at(unknown_region(t.region_id)))?;
            if region.is_poisoned() {
                return Err(at(region.poisoned_error()));
            }
            let view = t.resolve(region.size()).map_err(at)?;
            view.expect_dtype(what, &[DType::F32, DType::F16, DType::Bf16])?;
            if view.shape.len() != 3 || view.shape[0] != total {
                return Err(ErrorReply::new(
                    ErrorCode::ShapeMismatch,
                    format!(
                        "{what}: expected [{total}, heads, head_dim] (one row per new token), got {:?}",
                        view.shape
                    ),
                ));
            }
            Ok(TensorTarget {
                region: region.clone(),
                view,
            })
        };
        let q = resolve("q", &r.q)?;
        let k = resolve("k", &r.k)?;
        let v = resolve("v", &r.v)?;
        let out = resolve("out", &r.out)?;
        Ok(AttentionWork {
            session: s.id,
            layer: r.layer,
            seq_ids: r.seq_ids,
            rows,
            positions: r.positions,
            q,
            k,
            v,
            out,
        })
    }

    pub(super) fn health(&self, rid: u64) -> HealthReply {
        let v = super::health::judge(
            self.shared.fatal.get(),
            self.shared.busy_for(),
            Duration::from_millis(self.config.wedged_after_ms),
            self.stopping,
        );
        HealthReply {
            request_id: rid,
            status: v.status.into(),
            instance_id: self.info.instance_id.clone(),
            backend: self.info.backend.clone(),
            executor_idle_ms: self.info.gauges.idle_ms(),
            executor: Some(v.executor.into()),
            device: Some(v.device.into()),
            reason: v.reason,
        }
    }
}

/// A mapping failure as the client reads it.
fn ipc_reply(e: tacflow_ipc::Error) -> ErrorReply {
    match e {
        tacflow_ipc::Error::Protocol(r) => r,
        other => {
            warn!(cause = %other, "mapping a region failed");
            ErrorReply::bad_request(other.to_string())
        }
    }
}
