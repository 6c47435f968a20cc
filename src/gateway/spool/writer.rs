//! The spool writer: one OS thread, so blocking file I/O stays off the async
//! runtime. It takes everything queued, appends it and lets the forwarder
//! read it at once, then fsyncs (one fdatasync for all that was appended
//! since the last: group commit; what queues during an fsync shares the next
//! one; with `spool.fsync_wait_ms` a small group first waits that long for
//! company) and tells the pipeline which readings are durable (their PUBACKs
//! may go out), in order. One thread, not a writer and a syncer: at a steady
//! rate each batch then costs one wake-up here, not three.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::{Progress, Spool};
use crate::config::FsyncMode;
use crate::gateway::acks::IdPool;
use crate::gateway::acks::{AckEvent, AckId};
use crate::gateway::batch::Batch;
use crate::gateway::metrics::GatewayMetrics;
use crate::gateway::pool::BufPool;
use crate::sync::lock;

/// When appended records are fsynced (`spool.fsync`; with `Interval`, every
/// `interval`; with `Batch`, once the group's first record waited `wait` or
/// the group holds [`FSYNC_GROUP_BYTES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncPolicy {
    pub mode: FsyncMode,
    pub interval: Duration,
    pub wait: Duration,
}

impl SyncPolicy {
    pub fn from_config(c: &crate::config::SpoolConfig) -> Self {
        SyncPolicy {
            mode: c.fsync,
            interval: Duration::from_millis(c.fsync_interval_ms),
            wait: Duration::from_millis(c.fsync_wait_ms),
        }
    }
}

/// A group this large is fsynced without waiting for more (`spool.fsync_wait_ms`
/// is for low rates: at high ones a group fills in less than the wait).
pub const FSYNC_GROUP_BYTES: usize = 64 << 10;

/// Handle to the writer thread.
#[derive(Debug)]
pub struct Writer {
    /// The pipeline's batches: their records are written, their acks
    /// (readings with a record or without) confirmed in order once durable.
    pub tx: Sender<Batch>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Most records written per append.
const MAX_GROUP: usize = 8192;

impl Writer {
    pub fn start(
        spool: Arc<Mutex<Spool>>,
        policy: SyncPolicy,
        events: UnboundedSender<AckEvent>,
        metrics: GatewayMetrics,
        pools: (BufPool, IdPool),
    ) -> std::io::Result<Writer> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let shared = lock(&spool).progress().clone();
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                let mut w = WriteLoop {
                    spool,
                    shared,
                    policy,
                    events,
                    metrics,
                    stop: s,
                    pool: pools.0,
                    ids: pools.1,
                    file: None,
                    file_segment: None,
                    written: 0,
                    synced: 0,
                    pending: None,
                    acks: Vec::new(),
                    last_sync: Instant::now(),
                    full: false,
                };
                w.run(rx)
            })?;
        Ok(Writer {
            tx,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops after what is queued is written and fsynced (a blocked writer
    /// gives up at once: those readings were not acknowledged, so the broker
    /// still has them).
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        let (tx, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Adds a batch to the group; its buffer goes back to the pipeline.
fn take(b: Batch, group: &mut Vec<u8>, records: &mut usize, acks: &mut Vec<AckId>, pool: &BufPool) {
    if group.is_empty() {
        pool.give_buf(std::mem::replace(group, b.buf));
    } else {
        group.extend_from_slice(&b.buf);
        pool.give_buf(b.buf);
    }
    *records += b.records;
    acks.extend(b.acks);
}

/// The writer thread's state.
struct WriteLoop {
    spool: Arc<Mutex<Spool>>,
    shared: Arc<Progress>,
    policy: SyncPolicy,
    events: UnboundedSender<AckEvent>,
    metrics: GatewayMetrics,
    stop: Arc<AtomicBool>,
    pool: BufPool,
    ids: IdPool,
    /// A handle of the active segment, for fsync (the segment before it was
    /// fsynced when it was sealed), and which segment it is.
    file: Option<File>,
    file_segment: Option<u64>,
    /// Appended through / fsynced through.
    written: u64,
    synced: u64,
    /// The appended group not yet fsynced: since when, and its bytes.
    pending: Option<(Instant, usize)>,
    /// Readings not yet confirmed, in order.
    acks: Vec<AckId>,
    last_sync: Instant,
    /// The spool is full (appends wait).
    full: bool,
}

/// Why the writer stopped early (already reported to the pipeline, or the
/// pipeline is gone).
struct Stopped;

impl WriteLoop {
    fn run(&mut self, rx: Receiver<Batch>) {
        let mut group: Vec<u8> = Vec::new();
        let mut records = 0usize;
        let mut open = true;
        while open {
            let wait = match (self.policy.mode, self.pending) {
                (FsyncMode::Batch, Some((since, _))) => {
                    Some(self.policy.wait.saturating_sub(since.elapsed()))
                }
                (FsyncMode::Interval, Some(_)) => Some(
                    self.policy
                        .interval
                        .saturating_sub(self.last_sync.elapsed()),
                ),
                _ => None,
            };
            let first = match wait {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(w) => rx.recv_timeout(w),
            };
            let mut acks = std::mem::take(&mut self.acks);
            match first {
                Ok(b) => take(b, &mut group, &mut records, &mut acks, &self.pool),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
            while records < MAX_GROUP {
                match rx.try_recv() {
                    Ok(more) => take(more, &mut group, &mut records, &mut acks, &self.pool),
                    Err(_) => break,
                }
            }
            self.acks = acks;
            if records > 0 {
                if self.append(&mut group, records).is_err() {
                    return;
                }
                records = 0;
            }
            if self.settle(!open).is_err() {
                return;
            }
        }
    }

    /// Appends the group (waiting while the spool is full) and lets the
    /// forwarder read it.
    fn append(&mut self, group: &mut Vec<u8>, records: usize) -> Result<(), Stopped> {
        let bytes = group.len();
        loop {
            let appended = {
                let mut s = lock(&self.spool);
                let a = s.append_encoded(group, records);
                if a.as_ref().is_ok_and(|a| !a.full) {
                    // Forwarded before the fsync: the checkpoint still
                    // waits for it (Spool::checkpoint), and so do the acks.
                    s.publish();
                    self.written = self.written.max(s.next_offset());
                    if self.file_segment != Some(s.active_base()) {
                        match s.active_file() {
                            Ok(f) => self.file = Some(f),
                            Err(e) => {
                                return self.fatal(format!(
                                    "spool: a handle of the active segment for fsync: {e}"
                                ))
                            }
                        }
                        self.file_segment = Some(s.active_base());
                    }
                }
                a
            };
            match appended {
                Ok(a) => {
                    self.metrics
                        .spool_dropped_full(a.dropped_records, a.dropped_bytes);
                    if !a.full {
                        break;
                    }
                }
                Err(e) => return self.fatal(format!("spool write failed: {e}")),
            }
            if !self.full {
                self.full = true;
                self.metrics.spool_full(true);
                let _ = self.events.send(AckEvent::SpoolFull(true));
            }
            // What was appended before waits for no one: fsynced and
            // confirmed now (the checkpoint that frees space needs the fsync).
            self.settle(true)?;
            if self.stop.load(Ordering::Acquire) {
                return Err(Stopped);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.full {
            self.full = false;
            self.metrics.spool_full(false);
            let _ = self.events.send(AckEvent::SpoolFull(false));
        }
        self.metrics.spool_appended(records, bytes);
        let g = self.pending.get_or_insert((Instant::now(), 0));
        g.1 += bytes;
        group.clear();
        Ok(())
    }

    /// fsyncs when the policy says so (`now`: at once, e.g. when stopping),
    /// then confirms the readings it may: with `fsync = "batch"` only those
    /// behind fsynced records (in order), otherwise all (with `"interval"`
    /// fsyncing at most that long after; with `"never"`, only when stopping).
    fn settle(&mut self, now: bool) -> Result<(), Stopped> {
        let dirty = self.written > self.synced;
        let sync_now = dirty
            && (now
                || match self.policy.mode {
                    FsyncMode::Batch => self.pending.is_some_and(|(since, bytes)| {
                        bytes >= FSYNC_GROUP_BYTES || since.elapsed() >= self.policy.wait
                    }),
                    FsyncMode::Interval => self.last_sync.elapsed() >= self.policy.interval,
                    FsyncMode::Never => false,
                });
        if sync_now {
            if let Some(f) = &self.file {
                let t = Instant::now();
                if let Err(e) = f.sync_data() {
                    return self.fatal(format!("spool fsync failed: {e}"));
                }
                self.metrics.spool_fsync(t.elapsed());
            }
            self.last_sync = Instant::now();
        }
        if sync_now || (dirty && self.policy.mode == FsyncMode::Never) {
            self.synced = self.written;
            self.pending = None;
            self.shared.mark_synced(self.synced);
        }
        let confirm = self.policy.mode != FsyncMode::Batch || self.synced >= self.written;
        if confirm && !self.acks.is_empty() {
            let next = self.ids.take().unwrap_or_default();
            let acks = std::mem::replace(&mut self.acks, next);
            if self.events.send(AckEvent::Ready(acks)).is_err() {
                // The pipeline is gone: nothing more is confirmed.
                return Err(Stopped);
            }
        }
        Ok(())
    }

    fn fatal(&self, message: String) -> Result<(), Stopped> {
        let _ = self.events.send(AckEvent::Fatal(message));
        Err(Stopped)
    }
}
