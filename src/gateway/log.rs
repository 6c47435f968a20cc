//! The log: where accepted records wait for Kafka, behind one interface.
//!
//! The pipeline appends each wake-up's [`Batch`] through the [`Appender`] and
//! is told on one channel which readings are confirmed (their PUBACKs may go
//! out); the forwarder reads records from the [`Reader`] and releases them,
//! in order, once Kafka has them. Two implementations, chosen here and
//! nowhere else (`spool.enabled`):
//!
//! - **The disk spool** ([`spool`]): batches are appended by the
//!   writer thread, readings are confirmed after the group fsync (with
//!   `spool.fsync = "batch"`), and the released prefix becomes the spool
//!   checkpoint once a second. Records outlive Kafka outages and restarts;
//!   after a crash, what Kafka already has is not sent again
//!   ([`kafka_positions`]).
//! - **Memory** (`spool.enabled = false`): batches go straight to the
//!   forwarder, and a batch's readings are confirmed once Kafka has all of its
//!   records. Nothing outlives the process: unconfirmed readings are not
//!   acknowledged, so the broker still has them.
//!
//! Either way a reading without a record (a skipped duplicate, a rejection
//! with the DLQ off) is confirmed in order with the records around it.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::acks::AckEvent;
use super::acks::IdPool;
use super::batch::Batch;
use super::dedup::RecentlySeen;
use super::error::GatewayError;
use super::kafka_positions::{self, Positions};
use super::metrics::GatewayMetrics;
use super::pool::BufPool;
use super::spool::writer::{SyncPolicy, Writer};
use super::spool::{self, RecordRef, Spool, SpoolOptions, SpoolReader};
use crate::config::{GatewayConfig, KafkaConfig};
use crate::sync::lock;

/// The opened log.
#[derive(Debug)]
pub struct Opened {
    pub appender: Appender,
    pub reader: Reader,
    /// Which readings are confirmed (or that the log failed).
    pub confirmed: mpsc::UnboundedReceiver<AckEvent>,
    /// Recent readings (recovered from the spool), so that intake can skip
    /// redeliveries; `None` when nothing survives a restart (a skipped
    /// duplicate could then be acknowledged while its original is lost).
    pub recent: Option<RecentlySeen>,
    /// Where read lists of confirmed ids go back.
    pub ids: IdPool,
    /// Records outlive a Kafka outage (and a restart): the gateway stays ready
    /// while Kafka is down.
    pub durable: bool,
}

/// Opens the log `cfg.spool` asks for: the spool directory is recovered here,
/// so a directory we cannot use stops us before we connect anywhere.
pub fn open(cfg: &GatewayConfig, metrics: &GatewayMetrics) -> Result<Opened, GatewayError> {
    // Batch buffers come back to the appender from whoever is done with them,
    // and lists of confirmed ids from the acks stage.
    let pool = BufPool::default();
    let ids = IdPool::default();
    let (confirm_tx, confirmed) = mpsc::unbounded_channel();
    if !cfg.spool.enabled {
        let (tx, rx) = mpsc::unbounded_channel();
        return Ok(Opened {
            appender: Appender::new(To::Memory(tx), pool.clone()),
            reader: Reader {
                side: Side::Memory(MemorySide {
                    rx: Some(rx),
                    queued: VecDeque::new(),
                    kept: VecDeque::new(),
                    again: Vec::new(),
                    confirm: confirm_tx,
                    pool,
                }),
            },
            confirmed,
            recent: None,
            ids,
            durable: false,
        });
    }
    let (spool, reader, rec) = Spool::open(SpoolOptions {
        dir: cfg.spool.dir.clone(),
        max_bytes: cfg.spool.max_bytes,
        segment_bytes: cfg.spool.segment_bytes,
        on_full: cfg.spool.on_full,
    })
    .map_err(|e| {
        GatewayError::Spool(format!(
            "cannot open the spool in {} (spool.dir): {e}",
            cfg.spool.dir.display()
        ))
    })?;
    metrics.spool_recovered(&rec);
    let mut recent = RecentlySeen::new(spool::RECENT_KEEP);
    for (k, seq, ts) in &rec.recent {
        recent.check_and_insert(k, *seq, *ts);
    }
    let spool = Arc::new(Mutex::new(spool));
    let writer = Writer::start(
        spool.clone(),
        SyncPolicy::from_config(&cfg.spool),
        confirm_tx,
        metrics.clone(),
        (pool.clone(), ids.clone()),
    )
    .map_err(|e| GatewayError::Spool(format!("starting the writer threads: {e}")))?;
    let progress = lock(&spool).progress().clone();
    Ok(Opened {
        appender: Appender::new(To::Spool(writer), pool),
        reader: Reader {
            side: Side::Spool(Box::new(SpoolSide {
                reader,
                spool,
                progress,
                dir: cfg.spool.dir.clone(),
                pending: rec.pending_records,
                positions: Positions::new(&cfg.kafka.topic),
                positions_changed: false,
                released_through: None,
                checkpointed: 0,
                in_kafka: HashSet::new(),
                replay_left: 0,
                metrics: metrics.clone(),
            })),
        },
        confirmed,
        recent: Some(recent),
        ids,
        durable: true,
    })
}

/// The pipeline's side: the wake-up's batch, handed on when it is done.
#[derive(Debug)]
pub struct Appender {
    batch: Batch,
    pool: BufPool,
    to: To,
}

#[derive(Debug)]
enum To {
    Spool(Writer),
    Memory(mpsc::UnboundedSender<Batch>),
    Closed,
}

impl Appender {
    fn new(to: To, pool: BufPool) -> Self {
        Appender {
            batch: Batch::default(),
            pool,
            to,
        }
    }

    /// The batch this wake-up's readings go into.
    pub fn batch(&mut self) -> &mut Batch {
        &mut self.batch
    }

    /// Appends the batch (if anything is in it).
    pub fn flush(&mut self) -> Result<(), GatewayError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        // The next one gets a buffer back, or one the size of this one.
        let buf = self
            .pool
            .take()
            .unwrap_or_else(|| Vec::with_capacity(self.batch.buf.len()));
        let b = std::mem::replace(
            &mut self.batch,
            Batch {
                buf,
                ..Batch::default()
            },
        );
        match &self.to {
            To::Spool(w) => {
                w.tx.send(b)
                    .map_err(|_| GatewayError::Spool("the writer thread stopped".into()))
            }
            To::Memory(tx) => {
                if tx.send(b).is_err() {
                    warn!("forwarder stopped; readings left unacknowledged");
                }
                Ok(())
            }
            To::Closed => Ok(()),
        }
    }

    /// No more batches: the spool writer finishes what it has (written and
    /// fsynced); the memory log's reader ends once Kafka has the rest.
    pub fn close(&mut self) {
        if let To::Spool(w) = std::mem::replace(&mut self.to, To::Closed) {
            w.finish();
        }
    }
}

/// The forwarder's side: records in order, released once Kafka has them.
#[derive(Debug)]
pub struct Reader {
    side: Side,
}

#[derive(Debug)]
enum Side {
    Spool(Box<SpoolSide>),
    Memory(MemorySide),
}

#[derive(Debug)]
struct SpoolSide {
    reader: SpoolReader,
    spool: Arc<Mutex<Spool>>,
    progress: Arc<spool::Progress>,
    dir: PathBuf,
    /// Records recovery found not yet acknowledged by Kafka.
    pending: u64,
    /// Where the released prefix ends in each partition.
    positions: Positions,
    positions_changed: bool,
    /// Every offset below this is released (the next checkpoint).
    released_through: Option<u64>,
    checkpointed: u64,
    /// Values found in Kafka that a resend after a crash must not repeat...
    in_kafka: HashSet<u64>,
    /// ...among this many records still to be read again (then it is dropped).
    replay_left: u64,
    metrics: GatewayMetrics,
}

#[derive(Debug)]
struct MemorySide {
    /// `None` once the pipeline closed it.
    rx: Option<mpsc::UnboundedReceiver<Batch>>,
    /// Received and not yet read.
    queued: VecDeque<Batch>,
    /// Read, with the offset of their last record, until Kafka has them all
    /// (to send again if the producer is replaced).
    kept: VecDeque<(Option<u64>, Batch)>,
    /// Offsets to read again (sorted), from `kept`.
    again: Vec<u64>,
    confirm: mpsc::UnboundedSender<AckEvent>,
    pool: BufPool,
}

/// Most records read from the spool at once.
const READ_BATCH: usize = 2048;

impl Reader {
    /// Before the first read: after a crash, which of the records to resend
    /// Kafka already has (spool only; see `kafka_positions`).
    pub async fn recover(&mut self, cfg: &KafkaConfig) {
        let Side::Spool(s) = &mut self.side else {
            return;
        };
        s.positions = Positions::load(&s.dir, &cfg.topic);
        let pending = s.pending;
        if pending == 0 || s.positions.is_empty() {
            return;
        }
        let (cfg, positions) = (cfg.clone(), s.positions.clone());
        // Bounded: what was acknowledged after the last checkpoint (about a
        // second's worth) plus the in-flight window, and others' records; a
        // set of 8-byte fingerprints, at most a few MiB, dropped after the resend.
        let found = tokio::task::spawn_blocking(move || {
            kafka_positions::already_in_kafka(&cfg, &positions, 500_000, Duration::from_secs(15))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match found {
            Ok(found) => {
                info!(pending, read = found.len(), "resending what the spool checkpoint does not cover; records Kafka already has are skipped");
                s.in_kafka = found;
                s.replay_left = pending;
            }
            Err(e) => {
                warn!(pending, error = %e, "could not read the topic to find records Kafka already has (needs Read access); resending all, some may be duplicates")
            }
        }
    }

    /// Waits until there may be more to read.
    pub async fn wait(&mut self) {
        match &mut self.side {
            Side::Spool(s) => s.progress.notify.notified().await,
            Side::Memory(m) => match &mut m.rx {
                Some(rx) => match rx.recv().await {
                    Some(b) => m.queued.push_back(b),
                    None => m.rx = None,
                },
                None => std::future::pending().await,
            },
        }
    }

    /// Passes up to about `max` records to `f`, in order, each borrowed, with
    /// whether Kafka already has it (a resend after a crash): release those
    /// without sending them. Returns how many.
    pub fn read(
        &mut self,
        max: usize,
        mut f: impl FnMut(RecordRef<'_>, bool),
    ) -> Result<usize, GatewayError> {
        match &mut self.side {
            Side::Spool(s) => {
                let mut n = 0;
                while n < max {
                    let room = (max - n).min(READ_BATCH);
                    let corrupt = s.reader.corrupt_skipped;
                    let (in_kafka, replay_left) = (&mut s.in_kafka, &mut s.replay_left);
                    let got = s
                        .reader
                        .read_with(room, |rec| {
                            if *replay_left == 0 && !in_kafka.is_empty() {
                                *in_kafka = HashSet::new(); // past the resent records
                            }
                            let replayed = *replay_left > 0;
                            *replay_left = replay_left.saturating_sub(1);
                            let known = replayed
                                && !rec.dlq
                                && in_kafka.remove(&kafka_positions::fingerprint(rec.value));
                            f(rec, known);
                        })
                        .map_err(|e| GatewayError::Spool(format!("reading the spool: {e}")))?;
                    s.metrics
                        .spool_dropped_corrupt(s.reader.corrupt_skipped - corrupt);
                    n += got;
                    if got < room {
                        break;
                    }
                }
                Ok(n)
            }
            Side::Memory(m) => {
                let mut n = 0;
                if !m.again.is_empty() {
                    // Both in offset order: walk the kept batches along them.
                    let mut again = m.again.iter().copied().peekable();
                    for (_, batch) in &m.kept {
                        for rec in batch.records() {
                            while again.next_if(|&id| id < rec.offset).is_some() {}
                            if again.next_if_eq(&rec.offset).is_some() {
                                f(rec, false);
                                n += 1;
                            }
                        }
                    }
                    m.again.clear();
                }
                // Whole batches: the pipeline holds at most the window
                // unconfirmed, so they fit.
                while n < max {
                    let next = match m.queued.pop_front() {
                        Some(b) => b,
                        None => match m.rx.as_mut().map(|rx| rx.try_recv()) {
                            Some(Ok(b)) => b,
                            _ => break,
                        },
                    };
                    let mut last = None;
                    for rec in next.records() {
                        last = Some(rec.offset);
                        f(rec, false);
                        n += 1;
                    }
                    m.kept.push_back((last, next));
                }
                Ok(n)
            }
        }
    }

    /// The records at these offsets (sorted) were handed to a producer that
    /// was replaced: read them again. (The spool reads again from the first.)
    pub fn rewind(&mut self, unsettled: &[u64]) {
        let Some(&first) = unsettled.first() else {
            return;
        };
        match &mut self.side {
            Side::Spool(s) => s.reader.rewind(first),
            Side::Memory(m) => {
                m.again.clear();
                m.again.extend_from_slice(unsettled);
            }
        }
    }

    /// Kafka has the record at `offset` (at `at` in the topic; `None`: not
    /// there, e.g. dead-lettered or dropped). Called in offset order.
    pub fn release(&mut self, offset: u64, at: Option<(i32, i64)>) {
        if let Side::Spool(s) = &mut self.side {
            s.released_through = Some(offset + 1);
            if let Some((p, o)) = at {
                s.positions.note(p, o);
                s.positions_changed = true;
            }
        }
    }

    /// After a round of [`Reader::release`]: `unreleased` is the first offset
    /// still in flight. The memory log confirms the batches Kafka has whole.
    pub fn released(&mut self, unreleased: Option<u64>) {
        if let Side::Memory(m) = &mut self.side {
            while let Some((last, _)) = m.kept.front() {
                if unreleased.is_some_and(|u| last.is_some_and(|l| l >= u)) {
                    break;
                }
                if let Some((_, b)) = m.kept.pop_front() {
                    let _ = m.confirm.send(AckEvent::Ready(b.acks));
                    m.pool.give_buf(b.buf);
                }
            }
        }
    }

    /// Once a second and when stopping: the spool checkpoint (the released
    /// prefix, once fsynced), the Kafka positions after it, and the spool
    /// gauges (`oldest`: the age of the oldest record in flight).
    pub async fn checkpoint(&mut self, oldest: Option<Duration>) -> Result<(), GatewayError> {
        let Side::Spool(s) = &mut self.side else {
            return Ok(());
        };
        let through = s.released_through.filter(|&t| t > s.checkpointed);
        // After the checkpoint: positions older than it only mean reading more.
        let positions = (through.is_some() && s.positions_changed)
            .then(|| (s.positions.clone(), s.dir.clone()));
        let spool = s.spool.clone();
        let stats = tokio::task::spawn_blocking(move || {
            let mut s = lock(&spool);
            if let Some(t) = through {
                s.checkpoint(t)?;
            }
            // Positions past the checkpoint (it waits for the spool's fsync)
            // would skip records a crash resends; they wait a round instead.
            let saved = match positions {
                Some((p, dir)) if through.is_some_and(|t| s.acked() >= t) => {
                    if let Err(e) = p.save(&dir) {
                        warn!(error = %e, "writing the Kafka positions failed (a crash would resend more)");
                    }
                    true
                }
                _ => false,
            };
            let stats = (s.bytes(), s.segments(), s.next_offset() - s.acked());
            Ok::<_, std::io::Error>((stats, s.acked(), saved))
        })
        .await
        .map_err(|e| GatewayError::Spool(format!("checkpoint task: {e}")))?
        .map_err(|e| {
            error!(error = %e, "writing the spool checkpoint failed");
            GatewayError::Spool(format!("writing the spool checkpoint: {e}"))
        })?;
        let ((bytes, segments, records), acked, saved) = stats;
        s.checkpointed = acked;
        s.positions_changed &= !saved;
        let age = oldest.map_or(0.0, |d| d.as_secs_f64());
        s.metrics.spool_gauges(bytes, segments, records, age);
        Ok(())
    }

    /// Nothing more will be read (the memory log, once the pipeline closed it
    /// and every batch was read).
    pub fn ended(&self) -> bool {
        match &self.side {
            Side::Spool(_) => false,
            Side::Memory(m) => m.rx.is_none() && m.queued.is_empty(),
        }
    }

    /// How long to wait for Kafka when stopping: the spool keeps what is left
    /// for the next start, so it is worth the whole grace period; the memory
    /// log's readings are confirmed by then or never (the broker has them).
    pub fn stop_grace(&self, grace: Duration) -> Duration {
        match &self.side {
            Side::Spool(_) => grace,
            Side::Memory(_) => grace.min(Duration::from_secs(1)),
        }
    }
}
