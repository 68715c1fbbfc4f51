//! Metrics of the s2s edge (issue 4 item 7), defined next to what they measure. Every label
//! value comes from a fixed set: direction, auth method, stanza kind, RFC 6120 condition names,
//! `TlsFailure` labels, envelope error conditions. Never a domain or user string.

use crate::metrics;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec};
use std::sync::LazyLock;

pub const STREAMS_TOTAL: &str = "legate_s2s_streams_total";
pub const STREAMS_OPEN: &str = "legate_s2s_streams_open";
pub const STANZAS_TOTAL: &str = "legate_s2s_stanzas_total";
pub const STREAM_ERRORS_TOTAL: &str = "legate_s2s_stream_errors_total";
pub const TLS_FAILURES_TOTAL: &str = "legate_s2s_tls_failures_total";
pub const QUEUE_DEPTH: &str = "legate_s2s_queue_depth";
pub const BOUNCES_TOTAL: &str = "legate_s2s_bounces_total";
pub const REFUSED_TOTAL: &str = "legate_s2s_refused_total";
pub const UNROUTABLE_TOTAL: &str = "legate_s2s_unroutable_total";
pub const DEADLINES_TOTAL: &str = "legate_s2s_deadlines_expired_total";
pub const DIALBACK_REFUSED_TOTAL: &str = "legate_s2s_dialback_refused_total";

/// Authenticated streams, by direction (`inbound`/`outbound`) and method
/// (`external`/`dialback`).
pub static STREAMS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        STREAMS_TOTAL,
        "s2s streams authenticated, by direction and auth method",
        &["direction", "auth"],
    )
});

/// Connections currently open, by direction.
pub static OPEN: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    metrics::gauge_vec(
        STREAMS_OPEN,
        "s2s connections currently open, by direction",
        &["direction"],
    )
});

/// Stanzas received (`in`) and sent (`out`) by kind (`message`/`presence`/`iq`).
pub static STANZAS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        STANZAS_TOTAL,
        "s2s stanzas by direction and kind",
        &["direction", "kind"],
    )
});

/// Streams that ended in an error, by who sent it (`sent`/`received`) and RFC 6120 condition
/// (`none` when the connection just closed, e.g. a TLS failure).
pub static STREAM_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        STREAM_ERRORS_TOTAL,
        "s2s streams ended by an error, by side and condition",
        &["side", "condition"],
    )
});

pub static TLS_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        TLS_FAILURES_TOTAL,
        "s2s TLS handshake failures by direction and reason",
        &["direction", "reason"],
    )
});

/// Stanzas waiting in the outbound queues, all domains together (per-domain would be unbounded).
pub static QUEUE: LazyLock<IntGauge> =
    LazyLock::new(|| metrics::gauge(QUEUE_DEPTH, "stanzas queued for s2s delivery, all domains"));

pub static BOUNCES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        BOUNCES_TOTAL,
        "outbound stanzas bounced back to their sender, by condition",
        &["condition"],
    )
});

/// Inbound peers refused by federation policy, by reason (`domain_not_allowed`: not allowed by
/// `[xmpp.federation]`; `auth_not_allowed`: EXTERNAL-only domain without a matching
/// certificate). Plaintext attempts where TLS is required are refused by the negotiator itself
/// and show as stream errors (`policy-violation`, `not-authorized`).
pub static REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        REFUSED_TOTAL,
        "inbound s2s peers refused by federation policy, by reason",
        &["reason"],
    )
});

/// Inbound stanzas from an authenticated peer that cannot become an envelope (an address
/// without a user part, e.g. a bare domain), by outcome: `answered` (an iq get/set got an
/// error reply, RFC 6120 §8.2.3) or `dropped` (anything else).
pub static UNROUTABLE: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        UNROUTABLE_TOTAL,
        "inbound s2s stanzas that cannot be routed, by outcome",
        &["outcome"],
    )
});

/// Deadlines that closed a stream with `connection-timeout` (RFC 6120 §4.9.3.4), by
/// direction and phase: `stanza` (an element not completed within `limits.stanza_timeout_secs`
/// of its first byte) or `negotiation` (TLS + authentication not done in time).
pub static DEADLINES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        DEADLINES_TOTAL,
        "s2s streams closed because a deadline expired, by direction and phase",
        &["direction", "phase"],
    )
});

/// `<db:result/>` requests answered without a verification, by reason: `domain_busy` (the
/// per-domain bound), `node_busy` (the node-wide cap on verify connections),
/// `private_target` (every target resolved to a refused address; counted when it happens).
pub static DIALBACK_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    metrics::counter_vec(
        DIALBACK_REFUSED_TOTAL,
        "dialback verifications refused before any connection, by reason",
        &["reason"],
    )
});

/// Bounded label of a stanza element name.
pub fn kind(name: &str) -> &'static str {
    match name {
        "message" => "message",
        "presence" => "presence",
        "iq" => "iq",
        _ => "other",
    }
}

/// Creates this module's families at start (`crate::metrics::register_all`).
pub fn register() {
    for c in [
        &STREAMS,
        &STANZAS,
        &STREAM_ERRORS,
        &TLS_FAILURES,
        &BOUNCES,
        &REFUSED,
        &UNROUTABLE,
        &DEADLINES,
        &DIALBACK_REFUSED,
    ] {
        LazyLock::force(c);
    }
    LazyLock::force(&OPEN);
    LazyLock::force(&QUEUE);
}
