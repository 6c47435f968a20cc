//! The spool writer: two OS threads, so blocking file I/O stays off the async
//! runtime and a slow fsync holds back only PUBACKs. The writer takes
//! everything queued, appends it and lets the forwarder read it at once; the
//! syncer fsyncs what was appended (one fdatasync for all that was appended
//! meanwhile: group commit; with `spool.fsync_wait_ms` a small group first
//! waits that long for company), then tells the pipeline which readings are
//! durable (their PUBACKs may go out), in order.

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

/// Handle to the writer and syncer threads.
#[derive(Debug)]
pub struct Writer {
    /// The pipeline's batches: their records are written, their acks
    /// (readings with a record or without) confirmed in order once durable.
    pub tx: Sender<Batch>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Most records written per append.
const MAX_GROUP: usize = 8192;

/// What the writer hands the syncer after each append, in order.
struct Written {
    /// Every offset below this is appended (None: nothing was appended).
    through: Option<u64>,
    /// Bytes appended.
    bytes: usize,
    /// The readings of the append (and any without a record), in order.
    acks: Vec<AckId>,
    /// The active segment, when it changed: what the syncer fsyncs from now
    /// on (the segment before it was fsynced when it was sealed).
    file: Option<File>,
}

impl Writer {
    pub fn start(
        spool: Arc<Mutex<Spool>>,
        policy: SyncPolicy,
        events: UnboundedSender<AckEvent>,
        metrics: GatewayMetrics,
        pools: (BufPool, IdPool),
    ) -> std::io::Result<Writer> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (sync_tx, sync_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let shared = lock(&spool).progress().clone();
        let (ev, m, ids) = (events.clone(), metrics.clone(), pools.1.clone());
        let syncer = std::thread::Builder::new()
            .name("spool-sync".into())
            .spawn(move || sync_loop(sync_rx, policy, &shared, &ev, &m, &ids))?;
        let s = stop.clone();
        let writer = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || write_loop(spool, rx, sync_tx, events, metrics, s, pools))?;
        Ok(Writer {
            tx,
            stop,
            threads: vec![writer, syncer],
        })
    }

    /// Stops after what is queued is written and fsynced (a blocked writer
    /// gives up at once: those readings were not acknowledged, so the broker
    /// still has them).
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        let (tx, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        // The writer first: when it ends, the syncer has all there is.
        for t in self.threads.drain(..) {
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

fn write_loop(
    spool: Arc<Mutex<Spool>>,
    rx: Receiver<Batch>,
    syncer: Sender<Written>,
    events: UnboundedSender<AckEvent>,
    metrics: GatewayMetrics,
    stop: Arc<AtomicBool>,
    (pool, ids): (BufPool, IdPool),
) {
    // The group: records encoded back to back (numbered by the spool when
    // appended) and every reading's ack.
    let mut group: Vec<u8> = Vec::new();
    let mut records = 0usize;
    let mut acks: Vec<AckId> = Vec::new();
    let mut full = false;
    // The segment the syncer has a handle of.
    let mut synced_segment: Option<u64> = None;
    while let Ok(first) = rx.recv() {
        take(first, &mut group, &mut records, &mut acks, &pool);
        while records < MAX_GROUP {
            match rx.try_recv() {
                Ok(more) => take(more, &mut group, &mut records, &mut acks, &pool),
                Err(_) => break,
            }
        }
        let mut written = Written {
            through: None,
            bytes: group.len(),
            acks: Vec::new(),
            file: None,
        };
        if records > 0 {
            let bytes = group.len();
            loop {
                let appended = {
                    let mut s = lock(&spool);
                    let a = s.append_encoded(&mut group, records);
                    if a.as_ref().is_ok_and(|a| !a.full) {
                        // Forwarded before the fsync: the checkpoint still
                        // waits for it (Spool::checkpoint), and so do the acks.
                        s.publish();
                        written.through = Some(s.next_offset());
                        if synced_segment != Some(s.active_base()) {
                            match s.active_file() {
                                Ok(f) => written.file = Some(f),
                                Err(e) => {
                                    let _ = events.send(AckEvent::Fatal(format!(
                                        "spool: a handle of the active segment for fsync: {e}"
                                    )));
                                    return;
                                }
                            }
                            synced_segment = Some(s.active_base());
                        }
                    }
                    a
                };
                match appended {
                    Ok(a) => {
                        metrics.spool_dropped_full(a.dropped_records, a.dropped_bytes);
                        if !a.full {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = events.send(AckEvent::Fatal(format!("spool write failed: {e}")));
                        return;
                    }
                }
                if !full {
                    full = true;
                    metrics.spool_full(true);
                    let _ = events.send(AckEvent::SpoolFull(true));
                }
                if stop.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if full {
                full = false;
                metrics.spool_full(false);
                let _ = events.send(AckEvent::SpoolFull(false));
            }
            metrics.spool_appended(records, bytes);
            group.clear();
            records = 0;
        }
        written.acks = std::mem::replace(&mut acks, ids.take().unwrap_or_default());
        if syncer.send(written).is_err() {
            // The syncer failed (and said so): nothing more is confirmed.
            return;
        }
    }
}

/// fsyncs what the writer appended and confirms its readings in order: with
/// `fsync = "batch"` after the fsync (which waits up to `policy.wait` for
/// company), otherwise at once (with `"interval"` fsyncing at most that long
/// after; with `"never"`, only when stopping).
fn sync_loop(
    rx: Receiver<Written>,
    policy: SyncPolicy,
    shared: &Progress,
    events: &UnboundedSender<AckEvent>,
    metrics: &GatewayMetrics,
    ids: &IdPool,
) {
    let mut file: Option<File> = None;
    // Appended through / fsynced through.
    let (mut written, mut synced) = (0u64, 0u64);
    // The group not yet fsynced: since when, and its bytes.
    let mut group: Option<(Instant, usize)> = None;
    let mut acks: Vec<AckId> = Vec::new();
    let mut last_sync = Instant::now();
    let idle = Duration::from_secs(3600);
    let mut open = true;
    type Group = Option<(Instant, usize)>;
    let add = |w: Written,
               acks: &mut Vec<AckId>,
               file: &mut Option<File>,
               written: &mut u64,
               group: &mut Group| {
        if let Some(f) = w.file {
            *file = Some(f);
        }
        if let Some(t) = w.through {
            *written = (*written).max(t);
            let g = group.get_or_insert((Instant::now(), 0));
            g.1 += w.bytes;
        }
        if acks.is_empty() {
            ids.give_ids(std::mem::replace(acks, w.acks));
        } else {
            acks.extend_from_slice(&w.acks);
            ids.give_ids(w.acks);
        }
    };
    while open {
        let timeout = match (policy.mode, group) {
            (FsyncMode::Batch, Some((since, _))) => policy.wait.saturating_sub(since.elapsed()),
            (FsyncMode::Interval, _) => policy.interval,
            _ => idle,
        };
        match rx.recv_timeout(timeout) {
            Ok(w) => add(w, &mut acks, &mut file, &mut written, &mut group),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
        while let Ok(w) = rx.try_recv() {
            add(w, &mut acks, &mut file, &mut written, &mut group);
        }
        let dirty = written > synced;
        let sync_now = dirty
            && (!open
                || match policy.mode {
                    FsyncMode::Batch => group.is_some_and(|(since, bytes)| {
                        bytes >= FSYNC_GROUP_BYTES || since.elapsed() >= policy.wait
                    }),
                    FsyncMode::Interval => last_sync.elapsed() >= policy.interval,
                    FsyncMode::Never => false,
                });
        if sync_now {
            if let Some(f) = &file {
                let t = Instant::now();
                if let Err(e) = f.sync_data() {
                    let _ = events.send(AckEvent::Fatal(format!("spool fsync failed: {e}")));
                    return;
                }
                metrics.spool_fsync(t.elapsed());
            }
            last_sync = Instant::now();
        }
        if sync_now || (dirty && policy.mode == FsyncMode::Never) {
            synced = written;
            group = None;
            shared.mark_synced(synced);
        }
        // With "batch", readings behind records not yet fsynced wait for it
        // (their order is kept); the others are confirmed on write.
        let confirm = policy.mode != FsyncMode::Batch || synced >= written;
        if confirm
            && !acks.is_empty()
            && events
                .send(AckEvent::Ready(std::mem::replace(
                    &mut acks,
                    ids.take().unwrap_or_default(),
                )))
                .is_err()
        {
            return;
        }
    }
}
