//! The interworking core between the SIP edge, the XMPP s2s edge and the component links to
//! the home nodes.
//!
//! - `envelope`: the protocol-neutral unit every edge hands to the core.
//! - `router`: federation policy, the user → home node directory, presence translation — the
//!   pure decide stage.
//! - `policy`: consent — per-user allow/block lists, pending requests, polite blocking.
//! - `directory_store`: the learned directory in the state store (survives a restart).
//! - `hub`: the running switchboard: links register an outbox, `submit` routes and delivers.

pub mod directory_store;
pub mod envelope;
pub mod hub;
pub mod interwork;
pub mod policy;
pub mod router;

pub use envelope::{
    Address, Body, Envelope, ErrorCondition, MessageBody, PresenceBody, Subscription,
};
pub use hub::Hub;
pub use router::{Denied, Directory, Link, Origin, Refusal, Route};
