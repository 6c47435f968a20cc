//! The last TLS, login or authorization failure per peer: logged at error level,
//! counted in `<prefix>_security_errors_total{peer,kind}`, and shown by
//! `/readyz` until a later success clears it. Clients keep retrying with
//! backoff (credentials and ACLs can be fixed while we run).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, Opts, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityKind {
    /// Handshake: unknown CA, expired or missing certificate, wrong host name.
    Tls,
    /// Login refused: wrong password, unknown user, bad SASL mechanism.
    Auth,
    /// Logged in, but not allowed (Kafka ACL, MQTT ACL on subscribe).
    Acl,
}

impl SecurityKind {
    pub const ALL: [SecurityKind; 3] = [SecurityKind::Tls, SecurityKind::Auth, SecurityKind::Acl];
    /// What a successful connection proves fixed.
    pub const CONNECTION: [SecurityKind; 2] = [SecurityKind::Tls, SecurityKind::Auth];

    pub fn label(self) -> &'static str {
        match self {
            SecurityKind::Tls => "tls",
            SecurityKind::Auth => "auth",
            SecurityKind::Acl => "acl",
        }
    }
}

#[derive(Clone, Debug)]
pub struct SecurityStatus {
    errors: IntCounterVec,
    /// Per peer: the current failure and when it was last logged.
    last: Arc<Mutex<BTreeMap<&'static str, Failure>>>,
    /// Peers with a current failure, one bit each: the per-reading
    /// `cleared("kafka", ..)` is a lock-free load unless Kafka itself failed.
    active: Arc<AtomicU8>,
}

#[derive(Debug)]
struct Failure {
    kind: SecurityKind,
    message: String,
    logged: Instant,
}

/// The active-bit of a peer ("mqtt", "kafka").
fn bit(peer: &str) -> u8 {
    match peer {
        "mqtt" => 1,
        "kafka" => 2,
        _ => 4,
    }
}

/// The same failure is logged again at most this often (it is counted always).
const RELOG: Duration = Duration::from_secs(30);

impl SecurityStatus {
    /// Registers `<prefix>_security_errors_total`.
    pub fn new(registry: &Registry, prefix: &str) -> Self {
        let errors = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_security_errors_total"),
                "TLS handshake, login and authorization failures, by peer (mqtt, kafka) and kind (tls, auth, acl)",
            ),
            &["peer", "kind"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(errors.clone()))
            .expect("unique metric");
        SecurityStatus {
            errors,
            last: Arc::default(),
            active: Arc::default(),
        }
    }

    fn last(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Failure>> {
        crate::sync::lock(&self.last)
    }

    /// Records a failure: counted always, logged at error level (a repeat of
    /// the current failure at most every 30 s).
    pub fn failed(&self, peer: &'static str, kind: SecurityKind, message: String) {
        // The reason is in place before the count shows, so whoever sees the
        // count also finds the reason on /readyz.
        let counter = self.errors.with_label_values(&[peer, kind.label()]);
        let now = Instant::now();
        let mut last = self.last();
        let repeat = last
            .get(peer)
            .is_some_and(|f| f.message == message && now.duration_since(f.logged) < RELOG);
        if !repeat {
            tracing::error!(
                peer,
                kind = kind.label(),
                "{message}; retrying with backoff"
            );
            last.insert(
                peer,
                Failure {
                    kind,
                    message,
                    logged: now,
                },
            );
            self.active.fetch_or(bit(peer), Ordering::Relaxed);
        }
        drop(last);
        counter.inc();
    }

    /// A success on `peer` that proves `kinds` of failure fixed: logged once,
    /// and `/readyz` forgets it.
    pub fn cleared(&self, peer: &'static str, kinds: &[SecurityKind]) {
        self.cleared_if(peer, |kind, _| kinds.contains(&kind));
    }

    /// Clears the current failure of `peer` if `fixed(kind, message)`.
    pub fn cleared_if(&self, peer: &'static str, fixed: impl Fn(SecurityKind, &str) -> bool) {
        if self.active.load(Ordering::Relaxed) & bit(peer) == 0 {
            return;
        }
        let mut last = self.last();
        if last.get(peer).is_some_and(|f| fixed(f.kind, &f.message)) {
            if let Some(f) = last.remove(peer) {
                tracing::info!(peer, "{peer}: resolved (was: {})", f.message);
            }
        }
        if !last.contains_key(peer) {
            self.active.fetch_and(!bit(peer), Ordering::Relaxed);
        }
    }

    /// The failure `/readyz` shows for `peer`, if one is current.
    pub fn current(&self, peer: &'static str) -> Option<String> {
        if self.active.load(Ordering::Relaxed) & bit(peer) == 0 {
            return None;
        }
        self.last().get(peer).map(|f| f.message.clone())
    }
}
