//! Metrics of the SIP edge. Every label value comes from a fixed set (`method_label`,
//! `class_label`, refusal reasons as `&'static str` constants), never from a peer's strings.

use std::sync::{LazyLock, OnceLock};

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec};

use crate::metrics;

pub const REQUESTS: &str = "legate_sip_requests_total";
pub const RESPONSES: &str = "legate_sip_responses_total";
pub const TRANSACTIONS: &str = "legate_sip_transactions";
pub const DIALOGS: &str = "legate_sip_dialogs";
pub const SUBSCRIPTIONS: &str = "legate_sip_subscriptions";
pub const REFUSALS: &str = "legate_sip_refusals_total";
pub const CONNECTIONS: &str = "legate_sip_connections";
pub const CONNECTIONS_REFUSED: &str = "legate_sip_connections_refused_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "legate_sip_tls_handshake_failures_total";
pub const OUTBOUND_DIALS: &str = "legate_sip_dial_backoff_total";

/// Times the driver stopped reading SIP connections because a home node's outbox was nearly
/// full (backpressure instead of 480 answers).
pub static BACKPRESSURE_PAUSES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        "legate_sip_backpressure_pauses_total",
        "Times the SIP edge stopped reading its connections until a link had room, by link",
        &["link"],
    )
});

pub static REQUESTS_TOTAL: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        REQUESTS,
        "SIP requests by direction (in/out) and method",
        &["direction", "method"],
    )
});

pub static RESPONSES_TOTAL: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        RESPONSES,
        "SIP responses by direction (in/out) and class (1xx..6xx)",
        &["direction", "class"],
    )
});

pub static TXNS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    metrics::gauge_vec(
        TRANSACTIONS,
        "Live SIP transactions by side (client/server)",
        &["side"],
    )
});

pub static DIALOGS_G: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    metrics::gauge_vec(
        DIALOGS,
        "Live SIP dialogs by use (subscription_in, subscription_out, im)",
        &["use"],
    )
});

pub static SUBS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    metrics::gauge_vec(
        SUBSCRIPTIONS,
        "Presence subscriptions by role (notifier: foreign watcher; subscriber: local watcher; \
         batched: contacts in Lync batched subscriptions)",
        &["role"],
    )
});

pub static REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        REFUSALS,
        "SIP requests refused by the edge, by reason",
        &["reason"],
    )
});

pub static CONNS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    metrics::gauge_vec(
        CONNECTIONS,
        "Open SIP connections by kind (tcp_in, tls_in, tcp_out, tls_out)",
        &["kind"],
    )
});

pub static CONNS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        CONNECTIONS_REFUSED,
        "SIP connections refused or closed by a bound, by reason",
        &["reason"],
    )
});

pub static TLS_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        TLS_HANDSHAKE_FAILURES,
        "Failed TLS handshakes on the SIP listener, by reason",
        &["reason"],
    )
});

pub const NOTIFIES_UNCHANGED: &str = "legate_sip_notify_unchanged_total";

pub static NOTIFY_UNCHANGED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        NOTIFIES_UNCHANGED,
        "Presence NOTIFYs not sent, by reason (unchanged: state and body equal the dialog's \
         last NOTIFY)",
        &["reason"],
    )
});

pub static DIALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        OUTBOUND_DIALS,
        "Outbound SIP dials by outcome (failed: the domain enters backoff; blocked: a send \
         failed fast because the domain was in backoff)",
        &["outcome"],
    )
});

/// The bounded method labels (issue 6 item 9); `other` last.
const METHODS: [&str; 12] = [
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "MESSAGE",
    "SUBSCRIBE",
    "NOTIFY",
    "OPTIONS",
    "INFO",
    "BENOTIFY",
    "SERVICE",
    "other",
];

/// Bounded status-class labels, by `code / 100 - 1` (6xx and anything odd last).
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "6xx"];

/// Bounded method label (issue 6 item 9).
pub fn method_label(m: &str) -> &'static str {
    METHODS[method_index(m)]
}

fn method_index(m: &str) -> usize {
    METHODS
        .iter()
        .position(|&l| l == m)
        .unwrap_or(METHODS.len() - 1)
}

/// Bounded status-class label.
pub fn class_label(code: u16) -> &'static str {
    CLASSES[class_index(code)]
}

fn class_index(code: u16) -> usize {
    usize::from(code / 100).clamp(1, CLASSES.len()) - 1
}

/// The label sets' counters, each looked up once (on first use, so /metrics lists only the
/// label sets seen, as before): `with_label_values` hashes the labels and takes the family's
/// lock on every call, and these two run for every request and response. Indexed by
/// direction (`in`, `out`), then label.
struct Handles<const N: usize> {
    family: &'static LazyLock<IntCounterVec>,
    labels: &'static [&'static str; N],
    slots: [[OnceLock<IntCounter>; N]; 2],
}

impl<const N: usize> Handles<N> {
    const fn new(
        family: &'static LazyLock<IntCounterVec>,
        labels: &'static [&'static str; N],
    ) -> Self {
        Handles {
            family,
            labels,
            slots: [const { [const { OnceLock::new() }; N] }; 2],
        }
    }
    fn inc(&self, direction: &'static str, i: usize) {
        let d = usize::from(direction != "in");
        let (Some(slot), Some(label)) = (self.slots[d].get(i), self.labels.get(i)) else {
            return;
        };
        slot.get_or_init(|| self.family.with_label_values(&[["in", "out"][d], label]))
            .inc();
    }
}

static REQUEST_HANDLES: Handles<12> = Handles::new(&REQUESTS_TOTAL, &METHODS);
static RESPONSE_HANDLES: Handles<6> = Handles::new(&RESPONSES_TOTAL, &CLASSES);

/// Counts a request; `direction` is `in` or `out`.
pub fn request(direction: &'static str, method: &str) {
    REQUEST_HANDLES.inc(direction, method_index(method));
}

/// Counts a response; `direction` is `in` or `out`.
pub fn response(direction: &'static str, code: u16) {
    RESPONSE_HANDLES.inc(direction, class_index(code));
}

pub fn refused(reason: &'static str) {
    REFUSED.with_label_values(&[reason]).inc();
}

/// Creates this module's families at start (`crate::metrics::register_all`).
/// In a cluster: partners' in-dialog requests handed between nodes to the node owning the
/// dialog (its mark is on our tag).
pub static RELAYED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        "legate_sip_relayed_requests_total",
        "In-dialog SIP requests handed between cluster nodes to the node owning the dialog: \
         out (handed to the owner), in (handled for another node), failed (the owner could not \
         be reached: answered here), invalid (an unreadable handed request)",
        &["direction"],
    )
});

pub fn register() {
    for d in ["out", "in", "failed", "invalid"] {
        RELAYED.with_label_values(&[d]);
    }
    for c in [
        &BACKPRESSURE_PAUSES,
        &REQUESTS_TOTAL,
        &RESPONSES_TOTAL,
        &REFUSED,
        &CONNS_REFUSED,
        &TLS_FAILURES,
        &NOTIFY_UNCHANGED,
        &DIALS,
    ] {
        LazyLock::force(c);
    }
    for g in [&TXNS, &DIALOGS_G, &SUBS, &CONNS] {
        LazyLock::force(g);
    }
}
