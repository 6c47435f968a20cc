//! The spool writer: one OS thread that owns appends (blocking file I/O stays
//! off the async runtime). Group commit: it takes everything queued, writes it,
//! fsyncs once, then tells the pipeline which readings are durable (their
//! PUBACKs may go out). While an fsync runs, the next group queues up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::{Record, Spool};
use crate::gateway::acks::{AckEvent, AckId};
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

/// One reading for the writer; `record: None` writes nothing (a duplicate or a
/// reading dropped by intake) but is confirmed in order with the others.
#[derive(Debug)]
pub struct Entry {
    pub ack: AckId,
    pub record: Option<Record>,
}

/// Handle to the writer thread.
#[derive(Debug)]
pub struct Writer {
    pub tx: Sender<Vec<Entry>>,
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
    ) -> std::io::Result<Writer> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || run(spool, rx, policy, events, metrics, s))?;
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

fn run(
    spool: Arc<Mutex<Spool>>,
    rx: Receiver<Vec<Entry>>,
    policy: SyncPolicy,
    events: UnboundedSender<AckEvent>,
    metrics: GatewayMetrics,
    stop: Arc<AtomicBool>,
) {
    let mut group: Vec<Entry> = Vec::new();
    let mut records: Vec<Record> = Vec::new();
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
            Ok(first) => group.extend(first),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(more) => group.extend(more),
                Err(_) => break,
            }
        }
        records.clear();
        acks.clear();
        for e in group.drain(..) {
            acks.push(e.ack);
            records.extend(e.record);
        }
        if !records.is_empty() {
            loop {
                let appended = lock(&spool).append(&mut records);
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
            metrics.spool_appended(records.len());
            dirty = true;
        }
        let sync_now = dirty
            && match policy {
                SyncPolicy::Batch => true,
                SyncPolicy::Interval(d) => last_sync.elapsed() >= d,
                SyncPolicy::Never => false,
            };
        let mut s = lock(&spool);
        if sync_now {
            let t = Instant::now();
            if let Err(e) = s.sync() {
                let _ = events.send(AckEvent::Fatal(format!("spool fsync failed: {e}")));
                return;
            }
            metrics.spool_fsync(t.elapsed());
            last_sync = Instant::now();
            dirty = false;
        }
        if !acks.is_empty() {
            s.publish();
            drop(s);
            if events
                .send(AckEvent::Ready(std::mem::take(&mut acks)))
                .is_err()
            {
                break;
            }
        }
    }
    if dirty {
        let _ = lock(&spool).sync();
    }
}
