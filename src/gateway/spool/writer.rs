//! The spool writer: one OS thread that owns appends (blocking file I/O stays
//! off the async runtime). Group commit: it takes everything queued, writes it,
//! lets the forwarder read it, fsyncs once, then tells the pipeline which
//! readings are durable (their PUBACKs may go out). While an fsync runs, the
//! forwarder already sends the group to Kafka and the next group queues up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::Spool;
use crate::gateway::acks::{AckEvent, AckId};
use crate::gateway::batch::{Batch, BufPool, IdPool};
use crate::gateway::metrics::GatewayMetrics;

/// When appended records are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Before acknowledging them (group commit).
    Batch,
    /// At most this long after writing; acknowledged on write.
    Interval(Duration),
    /// Never by us (the OS writes back when it likes).
    Never,
}

impl SyncPolicy {
    pub fn from_config(c: &crate::config::SpoolConfig) -> Self {
        use crate::config::FsyncMode;
        match c.fsync {
            FsyncMode::Batch => SyncPolicy::Batch,
            FsyncMode::Interval => SyncPolicy::Interval(Duration::from_millis(c.fsync_interval_ms)),
            FsyncMode::Never => SyncPolicy::Never,
        }
    }
}

/// Handle to the writer thread.
#[derive(Debug)]
pub struct Writer {
    /// The pipeline's batches: their records are written, their acks
    /// (readings with a record or without) confirmed in order once durable.
    pub tx: Sender<Batch>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Most records written per fsync group.
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
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || run(spool, rx, policy, events, metrics, s, pools))?;
        Ok(Writer {
            tx,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops after what is queued (a blocked writer gives up at once: those
    /// readings were not acknowledged, so the broker still has them).
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        let (tx, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock(spool: &Mutex<Spool>) -> std::sync::MutexGuard<'_, Spool> {
    spool.lock().unwrap_or_else(|p| p.into_inner())
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

fn run(
    spool: Arc<Mutex<Spool>>,
    rx: Receiver<Batch>,
    policy: SyncPolicy,
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
    let mut last_sync = Instant::now();
    let mut dirty = false;
    let mut full = false;
    let tick = match policy {
        SyncPolicy::Interval(d) => d,
        _ => Duration::from_secs(3600),
    };
    loop {
        match rx.recv_timeout(tick) {
            Ok(first) => take(first, &mut group, &mut records, &mut acks, &pool),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        while records < MAX_GROUP {
            match rx.try_recv() {
                Ok(more) => take(more, &mut group, &mut records, &mut acks, &pool),
                Err(_) => break,
            }
        }
        if records > 0 {
            loop {
                let appended = {
                    let mut s = lock(&spool);
                    let a = s.append_encoded(&mut group, records);
                    if a.as_ref().is_ok_and(|a| !a.full) {
                        // Forwarded before the fsync: the checkpoint still
                        // waits for it (Spool::checkpoint), and so do the acks.
                        s.publish();
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
            metrics.spool_appended(records);
            dirty = true;
            group.clear();
            records = 0;
        }
        let sync_now = dirty
            && match policy {
                SyncPolicy::Batch => true,
                SyncPolicy::Interval(d) => last_sync.elapsed() >= d,
                SyncPolicy::Never => false,
            };
        if sync_now {
            let mut s = lock(&spool);
            let t = Instant::now();
            if let Err(e) = s.sync() {
                let _ = events.send(AckEvent::Fatal(format!("spool fsync failed: {e}")));
                return;
            }
            metrics.spool_fsync(t.elapsed());
            last_sync = Instant::now();
            dirty = false;
        } else if dirty && policy == SyncPolicy::Never {
            lock(&spool).assume_synced();
        }
        if !acks.is_empty()
            && events
                .send(AckEvent::Ready(std::mem::replace(
                    &mut acks,
                    ids.take().unwrap_or_default(),
                )))
                .is_err()
        {
            break;
        }
    }
    if dirty {
        let _ = lock(&spool).sync();
    }
}
