//! The Prometheus registry every layer registers its metrics in, and its text rendering for
//! the admin endpoint. Metrics are defined next to what they measure; label values always come
//! from fixed enums (`label()` methods), never from domain or user strings.
//!
//! Every `legate_` family is on `/metrics` from the start, with zero values (issue 14 item 7):
//! a dashboard or an alert rule sees 0, not "absent". [`register_all`] creates each family
//! (most are `LazyLock` statics created on first use), and each family gets its usual label
//! sets at zero when it is created ([`ZERO_SERIES`]); rarer label values appear when first
//! used. The helpers are idempotent by name, so a family created here first and by its own
//! module later is one family.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, Once};

pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

#[derive(Clone)]
enum Made {
    Counters(IntCounterVec),
    Gauges(IntGaugeVec),
    Gauge(IntGauge),
    Histograms(HistogramVec),
}

/// Every family created so far, by name.
static MADE: LazyLock<Mutex<HashMap<String, Made>>> = LazyLock::new(Mutex::default);

/// Per family, the values of each label whose cross product is set to zero at creation.
pub const ZERO_SERIES: &[(&str, &[&[&str]])] = &[
    (
        "legate_net_accept_refusals_total",
        &[EDGES, &["listener_full", "peer_full"]],
    ),
    (
        "legate_net_accept_errors_total",
        &[EDGES, &["resources", "aborted", "other"]],
    ),
    (
        "legate_backpressure_waits_total",
        &[LINKS, &["delivered", "timeout"]],
    ),
    (
        "legate_envelopes_total",
        &[LINKS, LINKS, &["message", "presence"], &["delivered"]],
    ),
    (
        "legate_denied_total",
        &[&[
            "domain_not_allowed",
            "spoofed_sender",
            "not_own_user",
            "not_local",
            "local_to_local",
            "no_home_node",
            "untranslatable",
            "not_for_sip",
            "nothing_to_deliver",
            "blocked",
            "group_chat_not_for_sip",
        ]],
    ),
    ("legate_sip_backpressure_pauses_total", &[&["component"]]),
    (
        "legate_sip_requests_total",
        &[
            &["in", "out"],
            &[
                "INVITE",
                "ACK",
                "BYE",
                "MESSAGE",
                "SUBSCRIBE",
                "NOTIFY",
                "OPTIONS",
            ],
        ],
    ),
    (
        "legate_sip_responses_total",
        &[&["in", "out"], &["1xx", "2xx", "3xx", "4xx", "5xx", "6xx"]],
    ),
    ("legate_sip_transactions", &[&["client", "server"]]),
    (
        "legate_sip_dialogs",
        &[&["subscription_in", "subscription_out", "im"]],
    ),
    (
        "legate_sip_subscriptions",
        &[&["notifier", "subscriber", "batched"]],
    ),
    (
        "legate_sip_refusals_total",
        &[&[
            "domain_not_allowed",
            "private_target",
            "message_timeout",
            "queue_full",
        ]],
    ),
    (
        "legate_sip_connections",
        &[&["tcp_in", "tls_in", "tcp_out", "tls_out"]],
    ),
    (
        "legate_sip_connections_refused_total",
        &[&[
            "write_timeout",
            "idle_timeout",
            "message_timeout",
            "first_request_timeout",
        ]],
    ),
    ("legate_sip_tls_handshake_failures_total", &[TLS_FAILURES]),
    ("legate_sip_notify_unchanged_total", &[&["unchanged"]]),
    ("legate_sip_dial_backoff_total", &[&["failed", "blocked"]]),
    (
        "legate_s2s_streams_total",
        &[&["inbound", "outbound"], &["external", "dialback"]],
    ),
    ("legate_s2s_streams_open", &[&["inbound", "outbound"]]),
    (
        "legate_s2s_stanzas_total",
        &[&["in", "out"], &["message", "presence", "iq"]],
    ),
    (
        "legate_s2s_stream_errors_total",
        &[&["sent", "received"], &["none"]],
    ),
    (
        "legate_s2s_tls_failures_total",
        &[&["inbound", "outbound"], TLS_FAILURES],
    ),
    (
        "legate_s2s_bounces_total",
        &[&[
            "remote-server-not-found",
            "remote-server-timeout",
            "service-unavailable",
        ]],
    ),
    ("legate_s2s_refused_total", &[&["auth_not_allowed"]]),
    ("legate_s2s_unroutable_total", &[&["answered", "dropped"]]),
    (
        "legate_s2s_deadlines_expired_total",
        &[&["inbound", "outbound"], &["negotiation", "stanza"]],
    ),
    (
        "legate_s2s_dialback_refused_total",
        &[&["domain_busy", "node_busy"]],
    ),
    (
        "legate_component_connects_total",
        &[&["connected", "connect", "not_authorized"]],
    ),
    (
        "legate_component_disconnects_total",
        &[&["closed", "stream_error"]],
    ),
    (
        "legate_component_stanzas_total",
        &[&["in", "out"], &["message", "presence", "iq"]],
    ),
    (
        "legate_component_bounced_total",
        &[&["queue_timeout", "closed", "encode"]],
    ),
    (
        "legate_component_domains_opened_total",
        &[&["opened", "refused"]],
    ),
    ("legate_store_writes_total", &[&["ok", "failed"]]),
    ("legate_store_commits_total", &[&["append", "compaction"]]),
    ("legate_mapping_reloads_total", &[&["ok", "refused"]]),
];

/// The accept loops' `edge` labels.
const EDGES: &[&str] = &[
    "admin",
    "sip_tcp",
    "sip_tls",
    "xmpp_s2s",
    "xmpp_s2s_direct_tls",
];
/// `tls::TlsFailure` labels.
const TLS_FAILURES: &[&str] = &[
    "no_shared_cipher",
    "protocol_version",
    "bad_certificate",
    "unknown_ca",
    "cert_expired",
    "not_tls",
    "timeout",
    "eof",
    "other",
];
/// The hub's link and origin labels.
const LINKS: &[&str] = &["component", "s2s", "sip"];

/// The cross product of `values` (one list per label).
fn label_sets(values: &[&[&'static str]]) -> Vec<Vec<&'static str>> {
    values.iter().fold(vec![Vec::new()], |sets, vs| {
        sets.iter()
            .flat_map(|s| {
                vs.iter().map(move |v| {
                    let mut n = s.clone();
                    n.push(*v);
                    n
                })
            })
            .collect()
    })
}

fn zero_sets(name: &str, arity: usize) -> Vec<Vec<&'static str>> {
    ZERO_SERIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| label_sets(v))
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s.len() == arity)
        .collect()
}

/// The family `name` if it exists, else `make()` registered under it.
fn once(name: &str, make: impl FnOnce() -> Made) -> Made {
    let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = made.get(name) {
        return m.clone();
    }
    let m = make();
    let boxed: Box<dyn prometheus::core::Collector> = match &m {
        Made::Counters(c) => Box::new(c.clone()),
        Made::Gauges(g) => Box::new(g.clone()),
        Made::Gauge(g) => Box::new(g.clone()),
        Made::Histograms(h) => Box::new(h.clone()),
    };
    if let Err(e) = REGISTRY.register(boxed) {
        tracing::error!(metric = name, error = %e, "metric registration failed");
    }
    made.insert(name.to_string(), m.clone());
    m
}

/// Registers (once) and returns a counter vector. A name clash is a programming error caught by
/// the first test that touches the metric, so it is reported loudly but never panics.
pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let make = || {
        let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| {
            tracing::error!(metric = name, error = %e, "invalid metric definition");
            #[allow(clippy::expect_used)]
            IntCounterVec::new(Opts::new("legate_invalid_metric", "fallback"), labels)
                .expect("static")
        });
        for set in zero_sets(name, labels.len()) {
            c.with_label_values(&set);
        }
        Made::Counters(c)
    };
    match once(name, make) {
        Made::Counters(c) => c,
        _ => {
            tracing::error!(metric = name, "metric defined twice with two kinds");
            IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|_| unreachable_vec())
        }
    }
}

#[allow(clippy::expect_used)]
fn unreachable_vec() -> IntCounterVec {
    IntCounterVec::new(Opts::new("legate_invalid_metric", "fallback"), &["x"]).expect("static")
}

pub fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let make = || {
        let g = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| {
            tracing::error!(metric = name, error = %e, "invalid metric definition");
            #[allow(clippy::expect_used)]
            IntGaugeVec::new(Opts::new("legate_invalid_gauge", "fallback"), labels).expect("static")
        });
        for set in zero_sets(name, labels.len()) {
            g.with_label_values(&set);
        }
        Made::Gauges(g)
    };
    match once(name, make) {
        Made::Gauges(g) => g,
        _ => {
            tracing::error!(metric = name, "metric defined twice with two kinds");
            #[allow(clippy::expect_used)]
            IntGaugeVec::new(Opts::new("legate_invalid_gauge", "fallback"), labels).expect("static")
        }
    }
}

/// Registers (once) and returns a histogram vector with `buckets` (seconds).
pub fn histogram_vec(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let fallback = || {
        #[allow(clippy::expect_used)]
        HistogramVec::new(
            HistogramOpts::new("legate_invalid_histogram", "fallback"),
            labels,
        )
        .expect("static")
    };
    let make = || {
        let h = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
        .unwrap_or_else(|e| {
            tracing::error!(metric = name, error = %e, "invalid metric definition");
            fallback()
        });
        for set in zero_sets(name, labels.len()) {
            h.with_label_values(&set);
        }
        Made::Histograms(h)
    };
    match once(name, make) {
        Made::Histograms(h) => h,
        _ => {
            tracing::error!(metric = name, "metric defined twice with two kinds");
            fallback()
        }
    }
}

pub fn gauge(name: &str, help: &str) -> IntGauge {
    let make = || {
        Made::Gauge(IntGauge::new(name, help).unwrap_or_else(|e| {
            tracing::error!(metric = name, error = %e, "invalid metric definition");
            #[allow(clippy::expect_used)]
            IntGauge::new("legate_invalid_gauge1", "fallback").expect("static")
        }))
    };
    match once(name, make) {
        Made::Gauge(g) => g,
        _ => {
            tracing::error!(metric = name, "metric defined twice with two kinds");
            #[allow(clippy::expect_used)]
            IntGauge::new("legate_invalid_gauge1", "fallback").expect("static")
        }
    }
}

/// Creates every `legate_` family (module doc). Called when the node starts and before each
/// `/metrics` rendering; cheap after the first call.
pub fn register_all() {
    static DONE: Once = Once::new();
    DONE.call_once(|| {
        crate::ops::alarms::register_metrics();
        crate::net::metrics::register();
        crate::gateway::hub::register_metrics();
        crate::sip::edge::metrics::register();
        crate::xmpp::s2s::metrics::register();
        crate::xmpp::link::register_metrics();
        crate::store::embedded::register_metrics();
        crate::cluster::register_metrics();
        crate::intercluster::register_metrics();
        // The mapping reloader's counter lives with the composition root, which keeps it in
        // a private static: created here by name (the helpers are idempotent).
        counter_vec(
            "legate_mapping_reloads_total",
            "Edits of the mapping directory seen by the reloader, by outcome (ok, refused)",
            &["outcome"],
        );
    });
}

/// The registry in Prometheus text format.
pub fn render() -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&REGISTRY.gather(), &mut buf) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets_are_the_cross_product() {
        assert_eq!(
            label_sets(&[&["a", "b"], &["x", "y", "z"]]).len(),
            6,
            "2 × 3"
        );
        assert_eq!(label_sets(&[&["a"]]), vec![vec!["a"]]);
    }

    #[test]
    fn every_zero_series_entry_names_a_family_that_register_all_creates() {
        register_all();
        let text = render();
        for (name, _) in ZERO_SERIES {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name}{{"))),
                "{name} has no zero series at start"
            );
        }
    }

    #[test]
    fn zero_series_labels_follow_the_enums_they_come_from() {
        let tls: Vec<&str> = crate::tls::TlsFailure::ALL
            .iter()
            .map(|f| f.label())
            .collect();
        assert_eq!(TLS_FAILURES, tls.as_slice());
    }

    #[test]
    fn the_helpers_are_idempotent_by_name() {
        let a = counter_vec("legate_test_idempotent_total", "t", &["k"]);
        let b = counter_vec("legate_test_idempotent_total", "t", &["k"]);
        a.with_label_values(&["v"]).inc();
        assert_eq!(b.with_label_values(&["v"]).get(), 1);
    }
}
