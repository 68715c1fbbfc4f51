//! IM sessions in the store, so that another cluster node can serve them when the one that set
//! them up dies (issue 12 item 3), and a restarted node can go on with them.
//!
//! An established session is one record, `sip/i/<local tag>/<remote tag>/<Call-ID>`, written
//! when its dialog exists (our 200 to the partner's INVITE, or the partner's 200 to ours) and
//! deleted when the session ends. It lives in the node's own part of the store, so the
//! leader's takeover moves it with the node's subscriptions ([`crate::cluster::takeover`]).
//! Restoring it rebuilds the dialog (RFC 3261 §12) and announces the new owner: the home node's
//! answers are then handed to this node, which sends them in the partner's own dialog, and the
//! partner's in-dialog requests (told apart by the dead node's mark) are handed here too.
//!
//! Our CSeq goes on from the stored one plus [`CSEQ_GAP`]: a record is written once, so the
//! stored number is behind the last request the old owner sent, and §12.2.1.1 wants each new
//! request's CSeq above it.

use super::persist::{DialogRec, StoreOp};
use super::*;

/// Store key prefix of IM session records.
pub const SESSION_PREFIX: &str = "sip/i/";

/// Added to the stored local CSeq on restore (see the module docs): more requests than one
/// session sends in its idle time.
const CSEQ_GAP: u32 = 10_000;

/// A session: version, dialog, local user (bare), SIP user (with its GRUU), domain.
#[derive(Debug, Serialize, Deserialize)]
struct SessionRec(u8, DialogRec, String, String, String);

const SESSION_RECORD_VERSION: u8 = 1;

fn session_key(id: &DialogId) -> String {
    format!(
        "{SESSION_PREFIX}{}/{}/{}",
        id.local_tag(),
        id.remote_tag(),
        id.call_id()
    )
}

impl Core {
    /// Notes the record of session `sid`, whose dialog now exists.
    pub(super) fn store_session(&mut self, sid: u64) {
        let Some(s) = self.sessions.get(&sid) else {
            return;
        };
        let Some(d) = &s.dialog else { return };
        let rec = SessionRec(
            SESSION_RECORD_VERSION,
            d.into(),
            s.local.bare_string(),
            s.remote.to_string(),
            s.domain.to_string(),
        );
        match serde_json::to_vec(&rec) {
            Ok(value) => self.session_ops.push(StoreOp::Put {
                key: session_key(&d.id),
                value,
            }),
            Err(e) => tracing::warn!(error = %e, "IM session record not written"),
        }
    }

    /// Notes the deletion of an ended session's record.
    pub(super) fn unstore_session(&mut self, dialog: &DialogId) {
        self.session_ops.push(StoreOp::Delete {
            key: session_key(dialog),
        });
    }

    /// Rebuilds an established session from its record; `Dropped` (and the record deleted)
    /// when it is unreadable, for a domain no longer federated, or its pair has a live session.
    pub(super) fn restore_session(
        &mut self,
        hub: &dyn HubPort,
        key: &str,
        value: &[u8],
        now: Instant,
    ) -> persist::Restored {
        let restored = self.session_from(hub, value, now);
        if restored.is_none() {
            self.session_ops.push(StoreOp::Delete {
                key: key.to_string(),
            });
        }
        match restored {
            Some(()) => persist::Restored::Session,
            None => persist::Restored::Dropped,
        }
    }

    fn session_from(&mut self, hub: &dyn HubPort, value: &[u8], now: Instant) -> Option<()> {
        let SessionRec(version, d, local, remote, domain) = serde_json::from_slice(value)
            .map_err(|e| tracing::warn!(error = %e, "unreadable IM session record dropped"))
            .ok()?;
        if version != SESSION_RECORD_VERSION {
            return None;
        }
        let (local, remote, domain) = (
            Address::parse(&local).ok()?,
            Address::parse(&remote).ok()?,
            Domain::parse(&domain).ok()?,
        );
        let cfg = hub.config();
        if cfg.sip_federated(&domain).is_none() || !cfg.is_local_domain(&local.domain) {
            return None;
        }
        let pair = (local.bare_string(), remote.bare_string());
        if self.session_pairs.contains_key(&pair) {
            return None;
        }
        let mut dialog: Dialog = d.into();
        dialog.local_cseq = dialog.local_cseq.saturating_add(CSEQ_GAP);
        let sid = self.id();
        let did = dialog.id.clone();
        let s = ImSession {
            id: sid,
            local,
            remote,
            domain,
            state: SessionState::Established,
            call_id: did.call_id().to_string(),
            local_tag: did.local_tag().to_string(),
            dialog: Some(dialog),
            invite_cseq: 0,
            queue: VecDeque::new(),
            last_activity: now,
            conn: None,
        };
        self.session_calls
            .insert((s.call_id.clone(), s.local_tag.clone()), sid);
        self.insert_session(s);
        self.session_dialogs.insert(did, sid);
        self.session_owned(&pair, true);
        self.session_pairs.insert(pair, sid);
        self.schedule(TimerKey::Session(sid), now + self.im_idle);
        // Written again under this node (a takeover moved it; a restart keeps it as it was).
        self.store_session(sid);
        Some(())
    }

    /// Says again that this node owns each of its sessions (when ownership is published).
    pub fn announce_sessions(&mut self) {
        let pairs: Vec<(String, String)> = self.session_pairs.keys().cloned().collect();
        for pair in &pairs {
            self.session_owned(pair, true);
        }
    }

    /// The session records to write or delete since the last call.
    pub(super) fn take_session_ops(&mut self) -> Vec<StoreOp> {
        std::mem::take(&mut self.session_ops)
    }
}
