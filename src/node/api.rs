//! The node's operations as the admin endpoint serves them: each returns the HTTP status and
//! the JSON body, so the HTTP layer only routes (`POST /reload`, `POST /drain`, `GET /drain`).

use super::{drain, reload};
use crate::gateway::Hub;
use serde_json::{json, Value};

/// The answer when the hub has no node around it (an edge started alone, in tests).
fn no_node() -> (u16, Value) {
    (
        503,
        json!({"error": "this endpoint is not served by a running node"}),
    )
}

/// `POST /reload`: 200 with the report when applied, 422 when refused (the report lists the
/// problems; the running configuration stays).
pub fn post_reload(hub: &Hub) -> (u16, Value) {
    let Some(control) = hub.node_control() else {
        return no_node();
    };
    let r = reload::reload(hub, control, reload::Trigger::Admin);
    let code = match r.outcome {
        reload::Outcome::Applied => 200,
        reload::Outcome::Refused => 422,
    };
    (code, serde_json::to_value(&r).unwrap_or_default())
}

/// `POST /drain`: enters maintenance mode (idempotent) and reports progress.
pub fn post_drain(hub: &Hub) -> (u16, Value) {
    let Some(control) = hub.node_control() else {
        return no_node();
    };
    (
        200,
        serde_json::to_value(drain::start(hub, control)).unwrap_or_default(),
    )
}

/// `GET /drain`: progress (`draining` false when no drain was asked).
pub fn get_drain(hub: &Hub) -> (u16, Value) {
    let Some(control) = hub.node_control() else {
        return no_node();
    };
    (
        200,
        serde_json::to_value(drain::status(hub, control)).unwrap_or_default(),
    )
}

/// `POST /cluster/force-config-update` (`legate cluster force-config-update`): a subordinate
/// drops its copy of the primary's configuration and applies the primary's again. 200 with
/// the report when applied, 422 when refused, 409 on the primary itself or outside a cluster.
pub async fn post_force_config_update(hub: &Hub) -> (u16, Value) {
    let Some(control) = hub.node_control() else {
        return no_node();
    };
    let Some(hook) = control.replication() else {
        return (
            409,
            json!({"error": "this node is not in a cluster (cluster.store = \"etcd\"): there is no primary to take the configuration from"}),
        );
    };
    match hook.force().await {
        Ok(r) => {
            let code = match r.outcome {
                reload::Outcome::Applied => 200,
                reload::Outcome::Refused => 422,
            };
            (code, serde_json::to_value(&r).unwrap_or_default())
        }
        Err(e) => (409, json!({ "error": e })),
    }
}
