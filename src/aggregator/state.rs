//! Aggregation state (pure: no I/O, time passed in). Per device: last values,
//! count, dew point and tumbling event-time windows; per partition: the highest
//! applied offset, so a replay is never applied twice.
//!
//! Window rule: a reading with event time `ts` belongs to the window
//! `[ts - ts % size, +size)`. A device's watermark is its highest event time
//! minus the allowed lateness; windows ending at or before it are closed, and a
//! reading for a closed window is counted as `late` and kept out of windows
//! (it still updates the last values and the count).
//!
//! Over 500 lines with its unit tests; the code is about 340.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::devices::DeviceMap;

use serde::Serialize;

/// Aggregation settings (the `[aggregation]` config section).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregationConfig {
    /// Tumbling window size.
    pub window_secs: u64,
    /// How long after a window's end late readings are still added to it.
    pub allowed_lateness_secs: u64,
    /// Closed windows kept per device (served by the JSON API).
    pub windows_kept: usize,
    /// A device silent for longer than this is offline.
    pub offline_after_secs: u64,
    /// A `seq` at most this far below a device's last one is a replay and
    /// skipped; further below, the device restarted its counter.
    pub seq_replay_window: u64,
    /// Devices kept at most; past it the least recently seen are forgotten
    /// (counted in aggregator_devices_evicted_total).
    pub max_devices: usize,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        AggregationConfig {
            window_secs: 60,
            allowed_lateness_secs: 10,
            windows_kept: 10,
            offline_after_secs: 60,
            seq_replay_window: 1000,
            max_devices: 50_000,
        }
    }
}

/// min/max/mean accumulator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    #[serde(skip)]
    sum: f64,
    #[serde(skip)]
    n: u64,
}

impl Stat {
    fn new(x: f64) -> Self {
        Stat {
            min: x,
            max: x,
            mean: x,
            sum: x,
            n: 1,
        }
    }

    fn add(&mut self, x: f64) {
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        self.sum += x;
        self.n += 1;
        self.mean = self.sum / self.n as f64;
    }
}

/// One tumbling window of one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Window {
    /// Start, epoch ms (inclusive).
    pub start_ms: i64,
    /// End, epoch ms (exclusive).
    pub end_ms: i64,
    pub count: u64,
    pub temperature: Stat,
    pub humidity: Stat,
    pub closed: bool,
}

/// Everything known about one device.
#[derive(Debug, Clone)]
pub struct DeviceState {
    pub partition: i32,
    pub temperature: f64,
    pub humidity: f64,
    /// Event time of the newest reading (the highest seen), epoch ms.
    pub last_ts_ms: i64,
    pub count: u64,
    last_seq: Option<u64>,
    /// `last_seq` came with a jump ahead past the `seen` bitmap: until a
    /// reading confirms it, a lower seq is a restart, not a duplicate (a forged
    /// or glitched seq far ahead must not drop the device's next readings).
    jumped: bool,
    /// Bit i: seq `last_seq - i` was applied. Readings of one device can reach
    /// Kafka out of order (gateways sharing a subscription, a spool replay):
    /// a lower seq not seen yet is new, not a replay.
    seen: u128,
    /// Open windows, oldest first.
    open: VecDeque<Window>,
    /// Closed windows, oldest first, at most `windows_kept`.
    closed: VecDeque<Window>,
}

impl DeviceState {
    pub fn dew_point(&self) -> f64 {
        dew_point(self.temperature, self.humidity)
    }

    /// Closed windows then open ones, oldest first.
    pub fn windows(&self) -> impl Iterator<Item = &Window> {
        self.closed.iter().chain(self.open.iter())
    }

    /// The newest closed window.
    pub fn last_closed(&self) -> Option<&Window> {
        self.closed.back()
    }
}

/// Dew point (deg C) by the Magnus formula (Alduchov & Eskridge constants).
pub fn dew_point(t: f64, rh: f64) -> f64 {
    const A: f64 = 17.625;
    const B: f64 = 243.04;
    let rh = rh.clamp(0.01, 100.0);
    let gamma = (rh / 100.0).ln() + A * t / (B + t);
    B * gamma / (A - gamma)
}

/// A reading ready to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub device: String,
    pub temperature: f64,
    pub humidity: f64,
    pub ts_ms: i64,
    pub seq: Option<u64>,
    pub partition: i32,
    pub offset: i64,
    /// Its `ts` is ahead of our synchronised clock past the margin: counted,
    /// but not the device's last value and in no window (an honest device
    /// with a wrong clock must not freeze the others' view of it).
    pub future: bool,
}

/// What applying a reading did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Counted, but its window was already closed.
    AppliedLate,
    /// Counted, but dated ahead of our clock (see [`Applied::future`]).
    AppliedFuture,
    /// At or below the partition's applied offset: a replay.
    ReplayedOffset,
    /// `seq` not newer than the device's last one (within the replay window).
    DuplicateSeq,
}

#[derive(Debug)]
pub struct State {
    pub cfg: AggregationConfig,
    /// At most `cfg.max_devices`, the least recently seen evicted first.
    pub devices: DeviceMap<DeviceState>,
    /// Highest applied offset per partition.
    applied: HashMap<i32, i64>,
}

impl Default for State {
    fn default() -> Self {
        State::new(AggregationConfig::default())
    }
}

impl State {
    pub fn new(cfg: AggregationConfig) -> Self {
        State {
            devices: DeviceMap::new(cfg.max_devices),
            cfg,
            applied: HashMap::new(),
        }
    }

    pub fn apply(&mut self, r: Applied) -> Outcome {
        if self
            .applied
            .get(&r.partition)
            .is_some_and(|&o| r.offset <= o)
        {
            return Outcome::ReplayedOffset;
        }
        self.applied.insert(r.partition, r.offset);
        // Saturating: config bounds keep these small, but `State` is public.
        let ms = |secs: u64| i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let size = ms(self.cfg.window_secs.max(1));
        let lateness = ms(self.cfg.allowed_lateness_secs);
        let kept = self.cfg.windows_kept;
        let replay_window = self.cfg.seq_replay_window;
        let (d, _) = self.devices.touch(&r.device, || DeviceState {
            partition: r.partition,
            temperature: r.temperature,
            humidity: r.humidity,
            // Known only from a future-dated reading: no trusted time yet
            // (offline, and the next reading becomes its last value).
            last_ts_ms: if r.future { 0 } else { r.ts_ms },
            count: 0,
            last_seq: None,
            jumped: false,
            seen: 0,
            open: VecDeque::new(),
            closed: VecDeque::new(),
        });
        match (r.seq, d.last_seq) {
            (Some(seq), Some(last)) if seq <= last && d.jumped => {
                // The jump to `last` was not confirmed: the device goes on
                // (or restarted) from here.
                d.seen = 1;
                d.last_seq = Some(seq);
                d.jumped = false;
            }
            (Some(seq), Some(last)) if seq <= last && last - seq <= replay_window => {
                let back = last - seq;
                if back >= u128::BITS as u64 || d.seen & (1 << back) != 0 {
                    return Outcome::DuplicateSeq;
                }
                d.seen |= 1 << back; // late, but new
            }
            (Some(seq), Some(last)) if seq > last => {
                let ahead = seq - last;
                d.jumped = ahead > u128::BITS as u64;
                d.seen = if ahead >= u128::BITS as u64 {
                    0
                } else {
                    d.seen << ahead
                } | 1;
                d.last_seq = Some(seq);
            }
            // First seq, or far below the last one: the device restarted.
            (Some(seq), _) => {
                d.seen = 1;
                d.last_seq = Some(seq);
                d.jumped = false;
            }
            (None, _) => {}
        }
        d.partition = r.partition;
        d.count += 1;
        if r.future {
            return Outcome::AppliedFuture;
        }
        // Last values are by event time: an older reading arriving late does not
        // replace them (a new device starts with this reading's ts).
        if r.ts_ms >= d.last_ts_ms {
            d.temperature = r.temperature;
            d.humidity = r.humidity;
            d.last_ts_ms = r.ts_ms;
        }
        let watermark = d.last_ts_ms.saturating_sub(lateness);
        let start = r.ts_ms.div_euclid(size).saturating_mul(size);
        let end = start.saturating_add(size);
        let outcome = if end <= watermark {
            Outcome::AppliedLate
        } else {
            match d.open.iter_mut().find(|w| w.start_ms == start) {
                Some(w) => {
                    w.count += 1;
                    w.temperature.add(r.temperature);
                    w.humidity.add(r.humidity);
                }
                None => {
                    let w = Window {
                        start_ms: start,
                        end_ms: end,
                        count: 1,
                        temperature: Stat::new(r.temperature),
                        humidity: Stat::new(r.humidity),
                        closed: false,
                    };
                    let at = d
                        .open
                        .iter()
                        .position(|o| o.start_ms > start)
                        .unwrap_or(d.open.len());
                    d.open.insert(at, w);
                }
            }
            Outcome::Applied
        };
        while d.open.front().is_some_and(|w| w.end_ms <= watermark) {
            if let Some(mut w) = d.open.pop_front() {
                w.closed = true;
                d.closed.push_back(w);
                while d.closed.len() > kept {
                    d.closed.pop_front();
                }
            }
        }
        outcome
    }

    /// Forgets revoked partitions and their devices (another instance owns them now).
    pub fn revoke(&mut self, partitions: &[i32]) {
        self.devices.retain(|d| !partitions.contains(&d.partition));
        for p in partitions {
            self.applied.remove(p);
        }
    }

    /// Devices whose newest reading (event time) is within the offline timeout;
    /// event time, so a replay of old data does not make a device look alive.
    pub fn online(&self, now_ms: i64) -> usize {
        self.devices
            .values()
            .filter(|d| self.is_online(d, now_ms))
            .count()
    }

    pub fn is_online(&self, d: &DeviceState, now_ms: i64) -> bool {
        let after =
            i64::try_from(self.cfg.offline_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        now_ms.saturating_sub(d.last_ts_ms) <= after
    }

    /// Devices sorted by id.
    pub fn sorted(&self) -> BTreeMap<&str, &DeviceState> {
        self.devices.iter().collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn r(device: &str, t: f64, h: f64, ts_ms: i64, seq: Option<u64>, offset: i64) -> Applied {
        Applied {
            device: device.into(),
            temperature: t,
            humidity: h,
            ts_ms,
            seq,
            partition: 0,
            offset,
            future: false,
        }
    }

    #[test]
    fn device_bound_evicts_the_least_recently_seen_and_keeps_the_rest_exact() {
        let mut s = State::new(AggregationConfig {
            max_devices: 16,
            ..Default::default()
        });
        let base = 1_767_225_600_000;
        let mut offset = 0;
        // "real" is seen between every invented id; 1,000 invented ids pass through.
        for i in 0..1000u64 {
            s.apply(r("real", 20.0, 50.0, base + i as i64, Some(i), offset));
            s.apply(r(&format!("x{i}"), 1.0, 1.0, base, Some(0), offset + 1));
            offset += 2;
            assert!(s.devices.len() <= 16);
        }
        assert_eq!(
            s.devices["real"].count, 1000,
            "a live device keeps its state"
        );
        assert_eq!(s.devices.evicted() as usize + s.devices.len(), 1001);
        assert!(s.devices.contains_key("x999") && !s.devices.contains_key("x0"));
    }

    #[test]
    fn dew_point_magnus() {
        // Reference values: 20 C / 50 % -> 9.3 C; 30 C / 80 % -> 26.2 C.
        assert!((dew_point(20.0, 50.0) - 9.26).abs() < 0.05);
        assert!((dew_point(30.0, 80.0) - 26.17).abs() < 0.05);
        assert!((dew_point(10.0, 100.0) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn windows_min_max_mean_and_closing() {
        let mut s = State::new(AggregationConfig {
            window_secs: 60,
            allowed_lateness_secs: 0,
            ..Default::default()
        });
        let base = 1_767_225_600_000; // window-aligned
        assert_eq!(s.apply(r("a", 10.0, 40.0, base, None, 0)), Outcome::Applied);
        assert_eq!(
            s.apply(r("a", 20.0, 60.0, base + 30_000, None, 1)),
            Outcome::Applied
        );
        assert_eq!(
            s.apply(r("a", 30.0, 50.0, base + 59_999, None, 2)),
            Outcome::Applied
        );
        let d = &s.devices["a"];
        assert!(d.last_closed().is_none());
        // Next window: closes the first.
        s.apply(r("a", 5.0, 10.0, base + 60_000, None, 3));
        let d = &s.devices["a"];
        let w = d.last_closed().unwrap();
        assert_eq!((w.start_ms, w.end_ms, w.count), (base, base + 60_000, 3));
        assert_eq!(
            (w.temperature.min, w.temperature.max, w.temperature.mean),
            (10.0, 30.0, 20.0)
        );
        assert_eq!(
            (w.humidity.min, w.humidity.max, w.humidity.mean),
            (40.0, 60.0, 50.0)
        );
        assert_eq!(d.count, 4);
        assert_eq!((d.temperature, d.humidity), (5.0, 10.0));
        // Late for the closed window: counted, not windowed.
        assert_eq!(
            s.apply(r("a", 99.0, 99.0, base + 1, None, 4)),
            Outcome::AppliedLate
        );
        assert_eq!(s.devices["a"].last_closed().unwrap().count, 3);
        assert_eq!(s.devices["a"].count, 5);
        assert_eq!(
            s.devices["a"].temperature, 5.0,
            "last value is by event time"
        );
    }

    #[test]
    fn lateness_keeps_windows_open() {
        let mut s = State::new(AggregationConfig {
            window_secs: 10,
            allowed_lateness_secs: 5,
            ..Default::default()
        });
        let base = 1_000_000;
        s.apply(r("a", 1.0, 1.0, base, None, 0));
        s.apply(r("a", 2.0, 1.0, base + 12_000, None, 1));
        // Watermark = 7_000 after start: window 0 is still open for late data.
        assert_eq!(
            s.apply(r("a", 3.0, 1.0, base + 9_000, None, 2)),
            Outcome::Applied
        );
        s.apply(r("a", 2.0, 1.0, base + 15_000, None, 3));
        let w = s.devices["a"].last_closed().unwrap();
        assert_eq!((w.count, w.temperature.max), (2, 3.0));
    }

    #[test]
    fn replays_are_not_counted_twice() {
        let mut s = State::new(AggregationConfig::default());
        assert_eq!(s.apply(r("a", 1.0, 1.0, 0, None, 5)), Outcome::Applied);
        assert_eq!(
            s.apply(r("a", 1.0, 1.0, 0, None, 5)),
            Outcome::ReplayedOffset
        );
        assert_eq!(
            s.apply(r("a", 1.0, 1.0, 0, None, 4)),
            Outcome::ReplayedOffset
        );
        assert_eq!(s.apply(r("b", 1.0, 1.0, 0, Some(7), 6)), Outcome::Applied);
        assert_eq!(
            s.apply(r("b", 1.0, 1.0, 0, Some(7), 7)),
            Outcome::DuplicateSeq
        );
        assert_eq!(s.apply(r("b", 1.0, 1.0, 0, Some(8), 8)), Outcome::Applied);
        // A counter restart far below is accepted.
        s.cfg.seq_replay_window = 3;
        assert_eq!(s.apply(r("b", 1.0, 1.0, 0, Some(1), 9)), Outcome::Applied);
        assert_eq!(s.devices["a"].count, 1);
        assert_eq!(s.devices["b"].count, 3);
    }

    #[test]
    fn out_of_order_seqs_count_once_each() {
        // Two gateways sharing a subscription: 1 3 2 5 4, then repeats of each.
        let mut s = State::new(AggregationConfig::default());
        let mut offset = 0;
        let mut apply = |s: &mut State, seq| {
            offset += 1;
            s.apply(r("a", 1.0, 1.0, 0, Some(seq), offset))
        };
        for seq in [1, 3, 2, 5, 4] {
            assert_eq!(apply(&mut s, seq), Outcome::Applied, "seq {seq}");
        }
        for seq in [1, 2, 3, 4, 5] {
            assert_eq!(apply(&mut s, seq), Outcome::DuplicateSeq, "seq {seq}");
        }
        // A jump past the 128 remembered seqs forgets them; once a reading
        // confirms the jump, older ones in the replay window are replays.
        assert_eq!(apply(&mut s, 500), Outcome::Applied);
        assert_eq!(apply(&mut s, 501), Outcome::Applied);
        assert_eq!(apply(&mut s, 499), Outcome::Applied);
        assert_eq!(apply(&mut s, 300), Outcome::DuplicateSeq);
        assert_eq!(s.devices["a"].count, 8);
    }

    /// Issue 27: a reading dated ahead of our clock is counted, but neither
    /// the last value nor in a window, also when it is the device's first.
    #[test]
    fn a_future_dated_reading_never_becomes_the_last_value() {
        let mut s = State::new(AggregationConfig::default());
        let future = |t, offset| Applied {
            future: true,
            ..r("a", t, 1.0, 9_000_000, None, offset)
        };
        assert_eq!(s.apply(future(80.0, 0)), Outcome::AppliedFuture);
        assert_eq!(s.apply(r("a", 21.0, 1.0, 1_000, None, 1)), Outcome::Applied);
        assert_eq!(s.apply(future(90.0, 2)), Outcome::AppliedFuture);
        let d = &s.devices["a"];
        assert_eq!((d.temperature, d.last_ts_ms, d.count), (21.0, 1_000, 3));
        assert_eq!(d.windows().map(|w| w.count).sum::<u64>(), 1);
    }

    /// Issue 23: one record with a forged `seq` far ahead made the device's
    /// next real readings count as duplicates. An unconfirmed jump is a
    /// restart: the readings after it are counted.
    #[test]
    fn a_forged_seq_far_ahead_does_not_drop_the_next_readings() {
        let mut s = State::new(AggregationConfig::default());
        let mut offset = 0;
        let mut apply = |s: &mut State, seq| {
            offset += 1;
            s.apply(r("a", 1.0, 1.0, 0, Some(seq), offset))
        };
        for seq in 1..=100 {
            assert_eq!(apply(&mut s, seq), Outcome::Applied);
        }
        assert_eq!(apply(&mut s, 600), Outcome::Applied, "forged");
        for seq in 101..=150 {
            assert_eq!(apply(&mut s, seq), Outcome::Applied, "seq {seq}");
        }
        assert_eq!(apply(&mut s, 150), Outcome::DuplicateSeq);
        assert_eq!(apply(&mut s, u64::MAX), Outcome::Applied, "forged");
        assert_eq!(apply(&mut s, 151), Outcome::Applied);
        assert_eq!(s.devices["a"].count, 153);
    }

    /// Event times at the ends of i64 do not overflow the window arithmetic,
    /// nor does a huge window size.
    #[test]
    fn extreme_timestamps_and_sizes_do_not_overflow() {
        for window_secs in [1, 60, u64::MAX] {
            let mut s = State::new(AggregationConfig {
                window_secs,
                allowed_lateness_secs: u64::MAX,
                offline_after_secs: u64::MAX,
                ..Default::default()
            });
            for (i, ts) in [i64::MAX, i64::MIN, 0, i64::MAX - 1, i64::MIN + 1]
                .into_iter()
                .enumerate()
            {
                s.apply(r("a", 1.0, 1.0, ts, None, i as i64));
            }
            assert_eq!(s.devices["a"].count, 5);
            let _ = s.online(i64::MIN);
            let _ = s.online(i64::MAX);
        }
    }

    #[test]
    fn revoke_drops_devices_of_the_partition() {
        let mut s = State::new(AggregationConfig::default());
        s.apply(r("a", 1.0, 1.0, 0, None, 0));
        s.apply(Applied {
            partition: 1,
            ..r("b", 1.0, 1.0, 0, None, 0)
        });
        s.revoke(&[0]);
        assert!(!s.devices.contains_key("a"));
        assert!(s.devices.contains_key("b"));
        // The offset memory went with it: a re-assigned partition starts fresh.
        assert_eq!(s.apply(r("a", 1.0, 1.0, 0, None, 0)), Outcome::Applied);
    }

    #[test]
    fn online_offline() {
        let mut s = State::new(AggregationConfig {
            offline_after_secs: 10,
            ..Default::default()
        });
        s.apply(r("a", 1.0, 1.0, 1_000, None, 0));
        s.apply(r("b", 1.0, 1.0, 5_000, None, 1));
        assert_eq!(s.online(11_000), 2);
        assert_eq!(s.online(11_001), 1);
        assert_eq!(s.online(20_000), 0);
    }
}
