//! Metrics of the edge kit. Labels: `edge` is a fixed `&'static str` given by the caller
//! (`sip_tcp`, `sip_tls`, `admin`...), `reason` comes from [`super::Refusal::label`] or the
//! fixed accept-error kinds below — never from peer text.

use std::sync::LazyLock;

use prometheus::IntCounterVec;

pub const ACCEPT_REFUSALS: &str = "legate_net_accept_refusals_total";
pub const ACCEPT_ERRORS: &str = "legate_net_accept_errors_total";

pub static REFUSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        ACCEPT_REFUSALS,
        "Accepted connections refused (closed at once), by edge and reason",
        &["edge", "reason"],
    )
});

pub static ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    crate::metrics::counter_vec(
        ACCEPT_ERRORS,
        "accept() errors by edge and kind (resources: EMFILE/ENFILE/ENOBUFS/ENOMEM)",
        &["edge", "kind"],
    )
});

/// Creates this module's families at start (`crate::metrics::register_all`).
pub fn register() {
    LazyLock::force(&REFUSALS);
    LazyLock::force(&ERRORS);
}
