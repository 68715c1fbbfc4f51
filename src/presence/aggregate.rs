//! A user's presence as the aggregate of their resources (RFC 6121 §4.7.2): a SIP watcher sees
//! one state per user, while the home node broadcasts one presence per XMPP resource (desktop,
//! phone, ...). This table keeps, per watched user (presentity), each resource's last state,
//! note and priority, and answers which one the user "is":
//!
//! 1. resources with a negative priority do not count as available (RFC 6121 §4.7.2.3: they
//!    never receive messages for the bare JID, so they do not make the user reachable);
//! 2. of the others, the highest priority wins (§4.7.2.3; an absent `<priority/>` is 0);
//! 3. on equal priority, the most available state wins, in the order of the canonical model
//!    (`mappings/canonical.toml` lists states from most to least available);
//! 4. on a full tie, the resource heard from last wins (its state is the freshest).
//!
//! A resource's `unavailable` (a state whose canonical meaning is `offline`) removes it; an
//! `unavailable` from the bare JID (RFC 6121 §4.3.2: the server's answer when no resource is
//! online) removes them all. No resource left means offline.
//!
//! Keyed per presentity, not per watcher: every watcher of alice reads the same table, so the
//! memory is one entry per watched user. It is sans-IO and takes the mapping snapshot as an
//! argument; it does not decide who may see what (polite blocking is the notifier's job).

use std::collections::HashMap;
use std::sync::Arc;

use crate::gateway::PresenceBody;
use crate::presence::map::MappingSet;

/// Resources kept per presentity: far above the devices one person signs in with, and small
/// enough that a misbehaving home node (or a client cycling random resource names) cannot grow
/// the table without bound; beyond it the least recently heard resource is forgotten.
pub const MAX_RESOURCES: usize = 16;

/// The canonical state meaning "not there" (RFC 6121 `type='unavailable'`).
const OFFLINE: &str = "offline";

/// One resource's last broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resource {
    /// The resource part; `None` for presence from the bare JID.
    name: Option<String>,
    /// Shared with every watcher's notifier that shows it: a home node sends the same
    /// presence once per watcher, and an equal one keeps this allocation (issue 11 item 10).
    body: Arc<PresenceBody>,
    /// Index of the state's canonical meaning in the canonical model: 0 is most available.
    rank: usize,
    /// Update counter when it was last heard (ties go to the freshest).
    heard: u64,
}

impl Resource {
    fn priority(&self) -> i8 {
        self.body.priority.unwrap_or(0)
    }
}

/// Per presentity (bare `user@domain`), its live resources.
#[derive(Debug, Default)]
pub struct ResourceTable {
    users: HashMap<String, Vec<Resource>>,
    clock: u64,
}

impl ResourceTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `body` from `resource` of `presentity` and returns the user's aggregate after it
    /// (`None`: no resource counts as available, the user is offline).
    pub fn update(
        &mut self,
        maps: &MappingSet,
        presentity: &str,
        resource: Option<&str>,
        body: PresenceBody,
    ) -> Option<Arc<PresenceBody>> {
        self.clock += 1;
        let rank = rank_of(maps, &body);
        let offline = maps.canonical.get(rank).is_some_and(|c| c == OFFLINE);
        let list = self.users.entry(presentity.to_string()).or_default();
        if offline {
            match resource {
                // RFC 6121 §4.3.2: from the bare JID it speaks for the whole account.
                None => list.clear(),
                Some(r) => list.retain(|x| x.name.as_deref() != Some(r)),
            }
        } else {
            let heard = self.clock;
            match list.iter_mut().find(|x| x.name.as_deref() == resource) {
                Some(x) => {
                    if *x.body != body {
                        x.body = Arc::new(body);
                    }
                    x.rank = rank;
                    x.heard = heard;
                }
                None => {
                    if list.len() >= MAX_RESOURCES {
                        if let Some(i) = list
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, x)| x.heard)
                            .map(|(i, _)| i)
                        {
                            list.swap_remove(i);
                        }
                    }
                    if list.is_empty() {
                        // Most users are signed in from one resource: room for one, not the
                        // default four (one list per watched user, issue 11 item 10).
                        list.reserve_exact(1);
                    }
                    list.push(Resource {
                        name: resource.map(str::to_string),
                        body: Arc::new(body),
                        rank,
                        heard,
                    });
                }
            }
        }
        if list.is_empty() {
            self.users.remove(presentity);
            return None;
        }
        self.aggregate(presentity)
    }

    /// The user's aggregate now (`None`: offline or unknown).
    pub fn aggregate(&self, presentity: &str) -> Option<Arc<PresenceBody>> {
        self.users
            .get(presentity)?
            .iter()
            .filter(|r| r.priority() >= 0)
            // Highest priority, then most available (lowest rank), then freshest.
            .max_by_key(|r| (r.priority(), std::cmp::Reverse(r.rank), r.heard))
            .map(|r| Arc::clone(&r.body))
    }

    /// Forgets a user nobody watches any more (their later broadcasts do not reach the edge,
    /// so what is kept would only go stale).
    pub fn forget(&mut self, presentity: &str) {
        self.users.remove(presentity);
    }

    /// Users with at least one live resource.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Live resources of one user (tests, status).
    pub fn resources(&self, presentity: &str) -> usize {
        self.users.get(presentity).map_or(0, Vec::len)
    }
}

/// The canonical rank of a presence body's state; a state the set does not know (a reload
/// removed it) ranks last but one, never as offline, so it is kept and shown as it came.
fn rank_of(maps: &MappingSet, body: &PresenceBody) -> usize {
    let known = maps.system_id(&body.system).and_then(|sys| {
        let s = maps.system(sys);
        s.state_id(&body.state).map(|id| s.state(id).canonical)
    });
    known.unwrap_or_else(|| {
        maps.canonical
            .iter()
            .position(|c| c == OFFLINE)
            .unwrap_or(maps.canonical.len())
            .saturating_sub(1)
    })
}

/// A presence body of `system` in `state` (tests and callers building offline bodies).
pub fn body(system: &str, state: &str, note: Option<&str>, priority: Option<i8>) -> PresenceBody {
    PresenceBody {
        system: Arc::from(system),
        state: Arc::from(state),
        note: note.map(str::to_string),
        priority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::map;

    const ALICE: &str = "alice@example.test";

    fn maps() -> MappingSet {
        map::embedded().expect("defaults")
    }

    fn lync(state: &str, note: Option<&str>, prio: Option<i8>) -> PresenceBody {
        body("lync", state, note, prio)
    }

    fn state(p: &Option<Arc<PresenceBody>>) -> Option<&str> {
        p.as_ref().map(|b| &*b.state)
    }

    #[test]
    fn the_issue_case_phone_signing_off_leaves_desktop_dnd() {
        let m = maps();
        let mut t = ResourceTable::new();
        t.update(
            &m,
            ALICE,
            Some("desktop"),
            lync("busy", Some("Busy thing"), None),
        );
        let a = t.update(&m, ALICE, Some("phone"), lync("available", None, None));
        // Equal priority: the more available phone wins while it is there.
        assert_eq!(state(&a), Some("available"));
        let a = t.update(&m, ALICE, Some("phone"), lync("offline", None, None));
        assert_eq!(state(&a), Some("busy"));
        assert_eq!(
            a.and_then(|b| b.note.clone()).as_deref(),
            Some("Busy thing"),
            "the desktop's own note stays"
        );
        assert_eq!(t.resources(ALICE), 1);
    }

    #[test]
    fn last_resource_leaving_gives_offline_and_frees_the_entry() {
        let m = maps();
        let mut t = ResourceTable::new();
        t.update(&m, ALICE, Some("a"), lync("away", None, None));
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.update(&m, ALICE, Some("a"), lync("offline", None, None)),
            None
        );
        assert!(t.is_empty());
        assert_eq!(t.aggregate(ALICE), None);
    }

    #[test]
    fn higher_priority_beats_more_available() {
        let m = maps();
        let mut t = ResourceTable::new();
        t.update(&m, ALICE, Some("desk"), lync("away", None, Some(10)));
        let a = t.update(&m, ALICE, Some("phone"), lync("available", None, Some(5)));
        assert_eq!(state(&a), Some("away"));
        // Absent priority is 0 (RFC 6121 §4.7.2.3).
        let a = t.update(&m, ALICE, Some("desk"), lync("away", None, None));
        assert_eq!(state(&a), Some("available"));
    }

    #[test]
    fn negative_priority_resources_do_not_count_as_available() {
        let m = maps();
        let mut t = ResourceTable::new();
        let a = t.update(&m, ALICE, Some("bot"), lync("available", None, Some(-1)));
        assert_eq!(a, None, "only a negative-priority resource: offline");
        let a = t.update(&m, ALICE, Some("desk"), lync("away", None, Some(0)));
        assert_eq!(state(&a), Some("away"));
        // It is still tracked: when it goes, the user is offline again.
        assert_eq!(t.resources(ALICE), 2);
        let a = t.update(&m, ALICE, Some("desk"), lync("offline", None, None));
        assert_eq!(a, None);
        assert_eq!(t.resources(ALICE), 1);
    }

    #[test]
    fn ties_follow_the_canonical_order_exhaustively() {
        let m = maps();
        let sys = m.system_id("lync").expect("lync");
        let states: Vec<(String, usize)> = m
            .system(sys)
            .state_ids()
            .map(|(_, s)| (s.name.to_string(), s.canonical))
            .filter(|(n, _)| n != "offline")
            .collect();
        for (a, ra) in &states {
            for (b, rb) in &states {
                let mut t = ResourceTable::new();
                t.update(&m, ALICE, Some("one"), lync(a, None, None));
                let got = t.update(&m, ALICE, Some("two"), lync(b, None, None));
                let want = if rb < ra { b } else { a };
                assert_eq!(state(&got), Some(want.as_str()), "{a} vs {b}");
            }
        }
    }

    /// A home node sends the same presence once per watcher: every watcher's notifier then
    /// holds one shared body, not a copy each; a different body is a new one.
    #[test]
    fn an_equal_update_keeps_the_shared_body() {
        let m = maps();
        let mut t = ResourceTable::new();
        let a = t.update(&m, ALICE, Some("desk"), lync("busy", None, None));
        let b = t.update(&m, ALICE, Some("desk"), lync("busy", None, None));
        assert!(matches!((&a, &b), (Some(a), Some(b)) if Arc::ptr_eq(a, b)));
        let c = t.update(&m, ALICE, Some("desk"), lync("away", None, None));
        assert_eq!(state(&c), Some("away"));
        assert!(matches!((&a, &c), (Some(a), Some(c)) if !Arc::ptr_eq(a, c)));
    }

    #[test]
    fn full_tie_goes_to_the_freshest_and_updates_replace() {
        let m = maps();
        let mut t = ResourceTable::new();
        t.update(&m, ALICE, Some("a"), lync("busy", Some("one"), None));
        let a = t.update(&m, ALICE, Some("b"), lync("busy", Some("two"), None));
        assert_eq!(a.and_then(|b| b.note.clone()).as_deref(), Some("two"));
        let a = t.update(&m, ALICE, Some("a"), lync("busy", Some("three"), None));
        assert_eq!(a.and_then(|b| b.note.clone()).as_deref(), Some("three"));
        assert_eq!(t.resources(ALICE), 2);
    }

    #[test]
    fn bare_unavailable_clears_every_resource() {
        let m = maps();
        let mut t = ResourceTable::new();
        t.update(&m, ALICE, Some("a"), lync("busy", None, None));
        t.update(&m, ALICE, Some("b"), lync("away", None, None));
        assert_eq!(t.update(&m, ALICE, None, lync("offline", None, None)), None);
        assert!(t.is_empty());
    }

    #[test]
    fn bare_available_is_its_own_resource() {
        let m = maps();
        let mut t = ResourceTable::new();
        t.update(&m, ALICE, None, lync("away", None, None));
        let a = t.update(&m, ALICE, Some("a"), lync("busy", None, None));
        assert_eq!(state(&a), Some("busy"));
        let a = t.update(&m, ALICE, Some("a"), lync("offline", None, None));
        assert_eq!(state(&a), Some("away"));
    }

    #[test]
    fn users_are_independent_and_forget_works() {
        let m = maps();
        let mut t = ResourceTable::new();
        t.update(&m, ALICE, Some("a"), lync("busy", None, None));
        t.update(&m, "bob@example.test", Some("a"), lync("away", None, None));
        assert_eq!(
            state(&t.aggregate("bob@example.test")),
            Some("away"),
            "bob's own"
        );
        t.forget(ALICE);
        assert_eq!(t.aggregate(ALICE), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn resources_are_bounded_dropping_the_stalest() {
        let m = maps();
        let mut t = ResourceTable::new();
        t.update(&m, ALICE, Some("old"), lync("available", None, Some(100)));
        for i in 0..MAX_RESOURCES {
            t.update(&m, ALICE, Some(&format!("r{i}")), lync("away", None, None));
        }
        assert_eq!(t.resources(ALICE), MAX_RESOURCES);
        assert_eq!(
            state(&t.aggregate(ALICE)),
            Some("away"),
            "the stalest (old) went"
        );
    }

    #[test]
    fn unknown_state_is_kept_not_taken_for_offline() {
        let m = maps();
        let mut t = ResourceTable::new();
        let a = t.update(&m, ALICE, Some("a"), lync("no-such-state", None, None));
        assert_eq!(state(&a), Some("no-such-state"));
        // Anything known beats it on a tie.
        let a = t.update(&m, ALICE, Some("b"), lync("out_of_office", None, None));
        assert_eq!(state(&a), Some("out_of_office"));
    }

    /// s2s peers aggregate themselves (RFC 6121 §4.7.2 is the receiving server's job): the
    /// path component link → router → s2s must keep each resource's full JID, its priority and
    /// its `unavailable`, so a foreign server sees two devices, not one flickering user.
    #[test]
    fn s2s_peers_get_per_resource_presence_with_full_jids() {
        use crate::gateway::router::translate_presence;
        use crate::gateway::Body;
        use crate::xmpp::convert::{envelope_to_stanza, stanza_to_envelope};
        use crate::xmpp::stream::{Limits, StreamEvent, StreamFramer};

        let m = maps();
        let mut f = StreamFramer::new(Limits::default());
        f.push(b"<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams'>");
        f.push(
            b"<presence from='alice@example.test/desktop' to='bob@partner.test'><show>dnd</show><status>Busy thing</status><priority>5</priority></presence>\
              <presence from='alice@example.test/phone' to='bob@partner.test' type='unavailable'/>",
        );
        let mut out = Vec::new();
        while let Ok(Some(ev)) = f.next_event() {
            if let StreamEvent::Stanza(s) = ev {
                let mut env = stanza_to_envelope(&s, "xmpp", &m).expect("from the home node");
                if let Body::Presence(p) = &env.body {
                    // What the router does for an s2s destination.
                    let t = translate_presence(&m, p, "fed-xmpp").expect("translates");
                    env.body = Body::Presence(t);
                }
                let mut bytes = Vec::new();
                envelope_to_stanza(&env, &m, &mut bytes).expect("to the s2s peer");
                out.push(String::from_utf8(bytes).expect("utf-8"));
            }
        }
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            out[0].contains("from='alice@example.test/desktop'")
                || out[0].contains("from=\"alice@example.test/desktop\""),
            "{}",
            out[0]
        );
        assert!(out[0].contains("<priority>5</priority>"), "{}", out[0]);
        assert!(out[1].contains("alice@example.test/phone"), "{}", out[1]);
        assert!(out[1].contains("unavailable"), "{}", out[1]);
    }
}
