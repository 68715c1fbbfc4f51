//! The on-disk schema of the mapping files (`mappings/`), exactly as admins write it. Nothing
//! here is validated beyond TOML syntax and field names; `build` turns these into the checked,
//! immutable `MappingSet`. Every value that a semantic check may complain about keeps its span
//! so the complaint can name `file:line:col`.

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanonicalFile {
    pub states: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Sip,
    Xmpp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Sip => "sip",
            Protocol::Xmpp => "xmpp",
        }
    }
}

/// Where a system's users are: on the enterprise's home nodes, or in a foreign domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Local,
    Federated,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: String,
    pub protocol: Spanned<Protocol>,
    pub role: Spanned<Role>,
    #[serde(default)]
    pub state: Vec<StateSpec>,
    #[serde(default)]
    pub decode: Vec<DecodeSpec>,
    pub from_canonical: Spanned<BTreeMap<String, Spanned<StateRefSpec>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    pub name: Spanned<String>,
    pub canonical: Spanned<String>,
    pub emit: Spanned<EmitSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BasicSpec {
    Open,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShowSpec {
    None,
    Chat,
    Away,
    Xa,
    Dnd,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmitSpec {
    pub availability: Option<u32>,
    pub activity: Option<String>,
    pub basic: Option<BasicSpec>,
    pub show: Option<ShowSpec>,
    pub note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeSpec {
    #[serde(rename = "match")]
    pub matcher: Spanned<MatchSpec>,
    pub state: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    pub availability: Option<[u32; 2]>,
    pub activity: Option<String>,
    pub basic: Option<BasicSpec>,
    pub show: Option<ShowSpec>,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    Canonical,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableFile {
    pub title: Spanned<String>,
    pub from: Spanned<String>,
    pub to: Spanned<Vec<Spanned<String>>>,
    pub fallback: Option<Spanned<Fallback>>,
    #[serde(default)]
    pub row: Vec<RowSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowSpec {
    pub from: Spanned<StateRefSpec>,
    pub to: Spanned<BTreeMap<String, Spanned<StateRefSpec>>>,
}

/// How a cell's note combines with the user's own status text (see mappings/tables/README.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotePolicy {
    #[default]
    Prefix,
    Fallback,
    Replace,
}

/// `"away"` or `{ state = "away", note = "Busy", note_policy = "replace" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRefSpec {
    pub state: String,
    pub note: Option<String>,
    pub note_policy: Option<NotePolicy>,
}

impl<'de> Deserialize<'de> for StateRefSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StateRefSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a state name or a table { state = .., note = .., note_policy = .. }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StateRefSpec, E> {
                Ok(StateRefSpec {
                    state: v.to_string(),
                    note: None,
                    note_policy: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StateRefSpec, A::Error> {
                let mut state = None;
                let mut note = None;
                let mut note_policy = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "state" => state = Some(map.next_value::<String>()?),
                        "note" => note = Some(map.next_value::<String>()?),
                        "note_policy" => note_policy = Some(map.next_value::<NotePolicy>()?),
                        other => {
                            return Err(de::Error::unknown_field(
                                other,
                                &["state", "note", "note_policy"],
                            ))
                        }
                    }
                }
                let state = state.ok_or_else(|| de::Error::missing_field("state"))?;
                Ok(StateRefSpec {
                    state,
                    note,
                    note_policy,
                })
            }
        }
        d.deserialize_any(V)
    }
}
