//! Translation between systems, and between wire facts and a system's states. Pure and
//! allocation-free unless a note has to be composed.

use super::set::{Cell, MappingSet, StateId, SystemId, Via};
use super::spec::NotePolicy;
use crate::presence::wire::{Basic, MsrtcPresence, PidfPresence, Show, XmppPresence};
use std::borrow::Cow;

/// The result of translating one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation<'a> {
    pub state: StateId,
    pub note: Option<Cow<'a, str>>,
    pub via: Via,
}

/// Protocol facts that decode rules match on; borrowed from a decoded wire value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts<'a> {
    pub availability: Option<u32>,
    pub activities: &'a [String],
    pub basic: Option<Basic>,
    /// `Some(None)`: the protocol says "no <show/>"; `None`: the protocol has no show at all.
    pub show: Option<Option<Show>>,
    pub note: Option<&'a str>,
}

impl<'a> Facts<'a> {
    pub fn from_xmpp(p: &'a XmppPresence) -> Self {
        Facts {
            availability: None,
            activities: &[],
            basic: Some(if p.unavailable {
                Basic::Closed
            } else {
                Basic::Open
            }),
            show: Some(p.show),
            note: p.status.as_deref(),
        }
    }

    pub fn from_pidf(p: &'a PidfPresence) -> Self {
        Facts {
            availability: None,
            activities: &p.activities,
            basic: p.basic,
            show: p.show.map(Some),
            note: p.note.as_deref(),
        }
    }

    pub fn from_msrtc(p: &'a MsrtcPresence) -> Self {
        Facts {
            availability: p.availability,
            activities: p.activity.as_slice(),
            basic: None,
            show: None,
            note: p.note.as_deref(),
        }
    }
}

/// A decoded state: which rule matched and the note left for the user once a rule consumed its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub state: StateId,
    pub note: Option<&'a str>,
    pub rule: usize,
}

fn combine<'a>(cell: &'a Cell, user: Option<&'a str>) -> Option<Cow<'a, str>> {
    let user = user.filter(|u| !u.trim().is_empty());
    match (cell.note.as_deref(), user) {
        (None, u) => u.map(Cow::Borrowed),
        (Some(c), None) => Some(Cow::Borrowed(c)),
        (Some(c), Some(u)) => match cell.policy {
            NotePolicy::Replace => Some(Cow::Borrowed(c)),
            NotePolicy::Fallback => Some(Cow::Borrowed(u)),
            NotePolicy::Prefix => {
                if u.to_lowercase().contains(&c.to_lowercase()) {
                    Some(Cow::Borrowed(u))
                } else {
                    Some(Cow::Owned(format!("{c}: {u}")))
                }
            }
        },
    }
}

impl MappingSet {
    /// Translates `state` (with the user's status text `note`) from one system to another.
    pub fn translate<'a>(
        &'a self,
        from: SystemId,
        to: SystemId,
        state: StateId,
        note: Option<&'a str>,
    ) -> Translation<'a> {
        let pair = self.pair(from, to);
        if let Some(n) = note {
            if !pair.note_rows.is_empty() {
                let trimmed = n.trim();
                for (st, want, res) in &pair.note_rows {
                    if *st == state && trimmed.eq_ignore_ascii_case(want) {
                        // The row consumed the note: only the cell's own note remains.
                        return Translation {
                            state: res.cell.state,
                            note: combine(&res.cell, None),
                            via: res.via,
                        };
                    }
                }
            }
        }
        match pair
            .by_state
            .get(usize::from(state.0))
            .and_then(|r| r.as_ref())
        {
            Some(res) => Translation {
                state: res.cell.state,
                note: combine(&res.cell, note),
                via: res.via,
            },
            // Unreachable for ids from this set; answer identity rather than panic.
            None => Translation {
                state,
                note: note.map(Cow::Borrowed),
                via: Via::Identity,
            },
        }
    }

    /// Reads wire facts as a state of `system`, using its decode rules (first match wins).
    pub fn decode<'a>(&self, system: SystemId, facts: &Facts<'a>) -> Decoded<'a> {
        let sys = self.system(system);
        for (i, r) in sys.decode.iter().enumerate() {
            if let Some((lo, hi)) = r.availability {
                match facts.availability {
                    Some(a) if a >= lo && a <= hi => {}
                    _ => continue,
                }
            }
            if let Some(act) = &r.activity {
                if !facts.activities.iter().any(|a| a.eq_ignore_ascii_case(act)) {
                    continue;
                }
            }
            if r.basic.is_some() && facts.basic != r.basic {
                continue;
            }
            if let Some(show) = r.show {
                if facts.show != Some(show) {
                    continue;
                }
            }
            let mut note = facts.note;
            if let Some(want) = &r.note {
                match facts.note {
                    Some(n) if n.trim().eq_ignore_ascii_case(want) => note = None,
                    _ => continue,
                }
            }
            return Decoded {
                state: r.state,
                note,
                rule: i,
            };
        }
        // Validation guarantees a catch-all rule; this keeps a hand-built set from panicking.
        Decoded {
            state: StateId(0),
            note: facts.note,
            rule: usize::MAX,
        }
    }

    /// The XMPP presence that publishes `state` of `system` with status text `note`.
    pub fn encode_xmpp(
        &self,
        system: SystemId,
        state: StateId,
        note: Option<&str>,
    ) -> XmppPresence {
        let emit = &self.system(system).state(state).emit;
        let unavailable = emit.basic == Some(Basic::Closed);
        XmppPresence {
            unavailable,
            show: if unavailable {
                None
            } else {
                emit.show.flatten()
            },
            status: note.or(emit.note.as_deref()).map(str::to_string),
            priority: None,
        }
    }

    /// The PIDF (RFC 3863 + RPID) document content for `state`.
    pub fn encode_pidf(
        &self,
        system: SystemId,
        state: StateId,
        note: Option<&str>,
        entity: &str,
    ) -> PidfPresence {
        let emit = &self.system(system).state(state).emit;
        PidfPresence {
            entity: entity.to_string(),
            basic: Some(emit.basic.unwrap_or(Basic::Open)),
            activities: emit.activity.iter().cloned().collect(),
            show: emit.show.flatten(),
            note: note.or(emit.note.as_deref()).map(str::to_string),
        }
    }

    /// The msrtc state category content for `state`.
    pub fn encode_msrtc(
        &self,
        system: SystemId,
        state: StateId,
        note: Option<&str>,
    ) -> MsrtcPresence {
        let emit = &self.system(system).state(state).emit;
        MsrtcPresence {
            availability: emit.availability,
            activity: emit.activity.clone(),
            note: note.or(emit.note.as_deref()).map(str::to_string),
        }
    }

    /// Human-readable route: source state, the table row or canonical hop, target state.
    pub fn describe_path(
        &self,
        from: SystemId,
        to: SystemId,
        input: StateId,
        t: &Translation,
    ) -> Vec<String> {
        let fs = self.system(from);
        let ts = self.system(to);
        let mut path = vec![format!("{}:{}", fs.name, fs.state(input).name)];
        match t.via {
            Via::Identity => {}
            Via::Row { table, row } => {
                let tb = &self.tables[table];
                let r = &tb.rows[row];
                path.push(format!("{} [{}:{}]", tb.title, tb.file, r.line));
            }
            Via::Canonical {
                canonical,
                fallback_of,
            } => {
                let hop = format!("canonical:{}", self.canonical[canonical]);
                match fallback_of {
                    Some(tix) => path.push(format!(
                        "{hop} (no row in {}; fallback)",
                        self.tables[tix].title
                    )),
                    None => path.push(format!("{hop} (no table maps {} -> {})", fs.name, ts.name)),
                }
            }
        }
        path.push(format!("{}:{}", ts.name, ts.state(t.state).name));
        path
    }
}
