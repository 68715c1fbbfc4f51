//! Operations: what an admin watches on a running node. `alarms` holds the named alarms
//! (sans-IO table, the shared handle on the hub, and the small drivers that watch the home-node
//! links and the certificates); `notify` tells systemd when the node is ready and stopping.

pub mod alarms;
pub mod certs;
pub mod notify;
