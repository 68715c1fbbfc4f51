//! An admin's change to a user's consent lists, applied at once on a running node: the
//! entry is set (and written through to the store), and watchers already subscribed see the
//! result — a newly blocked watcher gets offline (SIP: an offline NOTIFY, its subscription
//! alive; XMPP: unavailable presence), an unblocked or allowed one the user's current
//! presence (SIP: from the state the edge kept; XMPP, on unblock: a probe to the home node
//! on the watcher's behalf, answered only if the user approved it).
//!
//! Limits: a domain-wide block cannot reach XMPP watchers already subscribed (Legate does not
//! list a home node's rosters); they get offline with the user's next presence change.

use super::{domain_wide, offline_in, Full, PolicyError, Target, Verdict};
use crate::gateway::hub::{Delivery, Hub};
use crate::gateway::{Address, Body, Envelope, Link, Subscription};

/// What the admin asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Allow,
    Block,
    /// Removes the entry: the watcher is undecided again (or covered by a domain entry).
    Unblock,
}

impl Op {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Op::Allow),
            "block" => Some(Op::Block),
            "unblock" => Some(Op::Unblock),
            _ => None,
        }
    }
}

/// Why an admin change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Bad(#[from] PolicyError),
    #[error(transparent)]
    Full(#[from] Full),
}

/// A local user named by an admin: a bare JID of a local domain.
pub fn local_user(hub: &Hub, input: &str) -> Result<Address, PolicyError> {
    let user = Address::parse(input).map_err(|e| PolicyError::BadUser {
        input: input.chars().take(200).collect(),
        why: e.reason,
    })?;
    if user.resource.is_some() {
        return Err(PolicyError::HasResource(input.chars().take(200).collect()));
    }
    if !hub.config().is_local_domain(&user.domain) {
        return Err(PolicyError::NotLocalUser(user.bare_string()));
    }
    Ok(user)
}

/// Applies `op` for `user` and `target`, then tells the watchers concerned.
pub fn change(hub: &Hub, user: &Address, target: &Target, op: Op) -> Result<(), ChangeError> {
    let verdict = match op {
        Op::Allow => Some(Verdict::Allow),
        Op::Block => Some(Verdict::Block),
        Op::Unblock => None,
    };
    let u = user.bare_string();
    hub.policies().admin_set(&u, target.clone(), verdict)?;
    tracing::info!(user = %u, target = %target, op = ?op, "consent list changed by the admin");
    let Some(domain) = target.domain() else {
        return Ok(());
    };
    let cfg = hub.config();
    let blocked = hub.policies().consent(
        user,
        &target.address().unwrap_or_else(|| domain_wide(&domain)),
    ) == super::Consent::Blocked;
    if cfg.sip_federated(&domain).is_some() {
        // The SIP core re-renders every subscription of the user the entry covers.
        let to = match target {
            Target::Jid(_) => target.address(),
            Target::Domain(d) => Some(domain_wide(d)),
        };
        if let Some(to) = to {
            let s = if blocked {
                Subscription::Unsubscribed
            } else {
                Subscription::Subscribed
            };
            hub.deliver(Delivery::new(
                Link::Sip { domain },
                Envelope {
                    from: user.clone(),
                    to,
                    body: Body::Subscription(s),
                    stanza_id: None,
                    via_cluster: None,
                },
            ));
        }
    } else if cfg.xmpp_federation_allowed(&domain) {
        let Some(watcher) = (match target {
            Target::Jid(_) => target.address(),
            Target::Domain(_) => None,
        }) else {
            return Ok(());
        };
        if blocked {
            let link = Link::S2s { domain };
            if let Some(p) = offline_in(&cfg, &hub.maps().current(), &link) {
                hub.deliver(Delivery::new(
                    link,
                    Envelope {
                        from: user.clone(),
                        to: watcher,
                        body: Body::Presence(p),
                        stanza_id: None,
                        via_cluster: None,
                    },
                ));
            }
        } else if let (Op::Unblock, Some(home_node)) = (op, hub.directory().lookup(&cfg, user)) {
            // The home node answers the probe with the user's presence only if the user
            // approved this watcher (RFC 6121 §4.3.2); its refusal comes back as offline and,
            // no request being pending, is not stored as the user's answer. (Not for an
            // allow: that refusal would then read as the user revoking the allow.)
            hub.deliver(Delivery::new(
                Link::Component { home_node },
                Envelope {
                    from: watcher,
                    to: user.clone(),
                    body: Body::Subscription(Subscription::Probe),
                    stanza_id: None,
                    via_cluster: None,
                },
            ));
        }
    }
    Ok(())
}
