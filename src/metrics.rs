//! The Prometheus registry every layer registers its metrics in, and its text rendering for
//! the admin endpoint. Metrics are defined next to what they measure; label values always come
//! from fixed enums (`label()` methods), never from domain or user strings.

use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use std::sync::LazyLock;

pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

/// Registers (once) and returns a counter vector. A name clash is a programming error caught by
/// the first test that touches the metric, so it is reported loudly but never panics.
pub fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| {
        tracing::error!(metric = name, error = %e, "invalid metric definition");
        #[allow(clippy::expect_used)]
        IntCounterVec::new(Opts::new("legate_invalid_metric", "fallback"), labels).expect("static")
    });
    if let Err(e) = REGISTRY.register(Box::new(c.clone())) {
        tracing::error!(metric = name, error = %e, "metric registration failed");
    }
    c
}

pub fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| {
        tracing::error!(metric = name, error = %e, "invalid metric definition");
        #[allow(clippy::expect_used)]
        IntGaugeVec::new(Opts::new("legate_invalid_gauge", "fallback"), labels).expect("static")
    });
    if let Err(e) = REGISTRY.register(Box::new(g.clone())) {
        tracing::error!(metric = name, error = %e, "metric registration failed");
    }
    g
}

pub fn gauge(name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| {
        tracing::error!(metric = name, error = %e, "invalid metric definition");
        #[allow(clippy::expect_used)]
        IntGauge::new("legate_invalid_gauge1", "fallback").expect("static")
    });
    if let Err(e) = REGISTRY.register(Box::new(g.clone())) {
        tracing::error!(metric = name, error = %e, "metric registration failed");
    }
    g
}

/// The registry in Prometheus text format.
pub fn render() -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&REGISTRY.gather(), &mut buf) {
        tracing::error!(error = %e, "metrics encoding failed");
    }
    String::from_utf8_lossy(&buf).into_owned()
}
