//! The validated, immutable mapping set: systems, their states, the tables, and every
//! (source, target) route resolved ahead of time so that translation is a couple of indexed
//! loads. Building reports every problem of every file at once, each at `file:line:col`.

use super::spec::{
    BasicSpec, CanonicalFile, EmitSpec, Fallback, MatchSpec, NotePolicy, Protocol, Role, ShowSpec,
    StateRefSpec, SystemFile, TableFile,
};
use crate::diag::{Diagnostic, Diagnostics};
use crate::presence::wire::{Basic, Show};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use toml::Spanned;

/// Index of a system in a `MappingSet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SystemId(pub(crate) u16);

/// Index of a state within its system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateId(pub(crate) u16);

impl StateId {
    /// Position of the state in its system's file.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// One source file of a mapping set, as text.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path shown in diagnostics.
    pub path: PathBuf,
    /// Path relative to the mappings root (`canonical.toml`, `systems/lync.toml`, ...).
    pub rel: String,
    pub text: String,
}

/// How a state goes on the wire (see `emit` in the system files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Emit {
    pub availability: Option<u32>,
    pub activity: Option<String>,
    pub basic: Option<Basic>,
    /// `Some(None)` = explicitly no `<show/>`.
    pub show: Option<Option<Show>>,
    pub note: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StateDef {
    /// Shared: every presence translated into this state carries it (no copy per body).
    pub name: std::sync::Arc<str>,
    pub canonical: usize,
    pub emit: Emit,
}

/// One decode rule; all present conditions must hold.
#[derive(Debug, Clone)]
pub struct DecodeRule {
    pub availability: Option<(u32, u32)>,
    /// Lowercased.
    pub activity: Option<String>,
    pub basic: Option<Basic>,
    pub show: Option<Option<Show>>,
    /// Lowercased.
    pub note: Option<String>,
    pub state: StateId,
}

#[derive(Debug, Clone)]
pub struct System {
    /// Shared like [`StateDef::name`].
    pub name: std::sync::Arc<str>,
    pub description: String,
    pub protocol: Protocol,
    pub role: Role,
    pub states: Vec<StateDef>,
    pub decode: Vec<DecodeRule>,
    /// Indexed by canonical state.
    pub from_canonical: Vec<Cell>,
    pub file: String,
    by_name: HashMap<String, StateId>,
}

impl System {
    pub fn state_id(&self, name: &str) -> Option<StateId> {
        self.by_name.get(name).copied()
    }

    pub fn state(&self, id: StateId) -> &StateDef {
        &self.states[usize::from(id.0)]
    }

    /// Every state with its id, in file order.
    pub fn state_ids(&self) -> impl Iterator<Item = (StateId, &StateDef)> {
        self.states
            .iter()
            .enumerate()
            .map(|(i, s)| (StateId(i as u16), s))
    }

    pub fn state_names(&self) -> impl Iterator<Item = &str> {
        self.states.iter().map(|s| &*s.name)
    }
}

/// A target state plus the note a table cell adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    pub state: StateId,
    pub note: Option<Arc<str>>,
    pub policy: NotePolicy,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub from: StateId,
    /// Lowercased note the source must carry for this row to apply.
    pub from_note: Option<String>,
    pub from_note_display: Option<String>,
    pub cells: Vec<Cell>,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub title: String,
    pub file: String,
    pub line: usize,
    pub from: SystemId,
    pub to: Vec<SystemId>,
    pub fallback: bool,
    pub rows: Vec<Row>,
}

/// How a translation was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Identity,
    Row {
        table: usize,
        row: usize,
    },
    Canonical {
        canonical: usize,
        fallback_of: Option<usize>,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub cell: Cell,
    pub via: Via,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct PairRoutes {
    /// Indexed by source state: the route for a source without a matching note row.
    pub by_state: Vec<Option<Resolved>>,
    /// Rows that apply only with a given (lowercased) note.
    pub note_rows: Vec<(StateId, String, Resolved)>,
}

/// A complete, validated set of mapping files. Immutable: a reload builds a new one.
#[derive(Debug, Clone)]
pub struct MappingSet {
    pub canonical: Vec<String>,
    pub systems: Vec<System>,
    pub tables: Vec<Table>,
    sys_index: HashMap<String, SystemId>,
    /// `routes[from][to]`.
    pub(crate) routes: Vec<Vec<PairRoutes>>,
    /// SHA-1 (hex) over every source file's path and text: tells an admin which edit is live.
    pub digest: String,
}

impl MappingSet {
    pub fn system_id(&self, name: &str) -> Option<SystemId> {
        self.sys_index.get(name).copied()
    }

    pub fn system(&self, id: SystemId) -> &System {
        &self.systems[usize::from(id.0)]
    }

    pub fn system_names(&self) -> impl Iterator<Item = &str> {
        self.systems.iter().map(|s| &*s.name)
    }

    pub(crate) fn pair(&self, from: SystemId, to: SystemId) -> &PairRoutes {
        &self.routes[usize::from(from.0)][usize::from(to.0)]
    }

    /// Builds and validates a set from its files. `files` holds `canonical.toml`, then any
    /// number of `systems/*.toml` and `tables/*.toml`, identified by `rel`.
    pub fn build(files: &[SourceFile]) -> Result<MappingSet, Diagnostics> {
        Builder::default().run(files)
    }
}

#[derive(Default)]
struct Builder {
    diags: Vec<Diagnostic>,
}

struct Ctx<'a> {
    file: &'a SourceFile,
}

impl Ctx<'_> {
    fn diag(&self, span: Range<usize>, msg: impl Into<String>) -> Diagnostic {
        Diagnostic::at_offset(&self.file.path, &self.file.text, span.start, msg)
    }
    fn line(&self, span: Range<usize>) -> usize {
        crate::diag::line_col(&self.file.text, span.start).0
    }
}

fn list(names: impl Iterator<Item = impl AsRef<str>>) -> String {
    names
        .map(|n| n.as_ref().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn basic_of(b: BasicSpec) -> Basic {
    match b {
        BasicSpec::Open => Basic::Open,
        BasicSpec::Closed => Basic::Closed,
    }
}

fn show_of(s: ShowSpec) -> Option<Show> {
    match s {
        ShowSpec::None => None,
        ShowSpec::Chat => Some(Show::Chat),
        ShowSpec::Away => Some(Show::Away),
        ShowSpec::Xa => Some(Show::Xa),
        ShowSpec::Dnd => Some(Show::Dnd),
    }
}

fn is_catch_all(m: &MatchSpec) -> bool {
    m.availability.is_none()
        && m.activity.is_none()
        && m.basic.is_none()
        && m.show.is_none()
        && m.note.is_none()
}

impl Builder {
    fn parse<T: serde::de::DeserializeOwned>(&mut self, f: &SourceFile) -> Option<T> {
        match toml::from_str::<T>(&f.text) {
            Ok(v) => Some(v),
            Err(e) => {
                self.diags.push(Diagnostic::from_toml(&f.path, &f.text, &e));
                None
            }
        }
    }

    fn run(mut self, files: &[SourceFile]) -> Result<MappingSet, Diagnostics> {
        let mut canonical_file = None;
        let mut system_files = Vec::new();
        let mut table_files = Vec::new();
        for f in files {
            if f.rel == "canonical.toml" {
                canonical_file = Some(f);
            } else if f.rel.starts_with("systems/") {
                system_files.push(f);
            } else if f.rel.starts_with("tables/") {
                table_files.push(f);
            } else {
                self.diags.push(Diagnostic::new(
                    &f.path,
                    0,
                    0,
                    "unexpected mapping file: states go in systems/*.toml, tables in tables/*.toml, \
                     the canonical model in canonical.toml",
                ));
            }
        }

        // Canonical model.
        let mut canonical: Vec<String> = Vec::new();
        match canonical_file {
            None => self.diags.push(Diagnostic::new(
                files
                    .first()
                    .map(|f| f.path.with_file_name("canonical.toml"))
                    .unwrap_or_default(),
                0,
                0,
                "missing canonical.toml: the canonical presence model is required",
            )),
            Some(f) => {
                if let Some(c) = self.parse::<CanonicalFile>(f) {
                    let cx = Ctx { file: f };
                    for s in &c.states {
                        if canonical.iter().any(|x| x == s.get_ref()) {
                            self.diags.push(cx.diag(
                                s.span(),
                                format!("duplicate canonical state `{}`", s.get_ref()),
                            ));
                        } else if !valid_token(s.get_ref()) {
                            self.diags.push(cx.diag(
                                s.span(),
                                format!(
                                    "invalid state name `{}`: use lowercase letters, digits and _",
                                    s.get_ref()
                                ),
                            ));
                        } else {
                            canonical.push(s.get_ref().clone());
                        }
                    }
                    if c.states.is_empty() {
                        self.diags
                            .push(cx.diag(0..0, "the canonical model has no states"));
                    }
                }
            }
        }

        // Systems, in two passes: states first (so that names resolve), then rules.
        let mut systems: Vec<System> = Vec::new();
        let mut sys_index: HashMap<String, SystemId> = HashMap::new();
        let mut parsed: Vec<(&SourceFile, SystemFile)> = Vec::new();
        // Systems whose file does not parse: tables naming them are skipped rather than
        // reported again as "unknown system" (one mistake, one message).
        let mut broken: Vec<String> = Vec::new();
        for f in &system_files {
            match self.parse::<SystemFile>(f) {
                Some(s) => parsed.push((f, s)),
                None => broken.push(broken_system_name(f)),
            }
        }
        for (f, s) in &parsed {
            let cx = Ctx { file: f };
            let name = s.name.get_ref().clone();
            if let Some(prev) = sys_index.get(&name) {
                let prev = &systems[usize::from(prev.0)];
                self.diags.push(cx.diag(
                    s.name.span(),
                    format!("system `{name}` is already defined in {}", prev.file),
                ));
                continue;
            }
            if !valid_system_name(&name) {
                self.diags.push(cx.diag(
                    s.name.span(),
                    format!("invalid system name `{name}`: use lowercase letters, digits and -"),
                ));
                continue;
            }
            let protocol = *s.protocol.get_ref();
            let role = *s.role.get_ref();
            if protocol == Protocol::Sip && role == Role::Local {
                self.diags.push(cx.diag(
                    s.role.span(),
                    "a sip system must be federated: the enterprise's home nodes speak XMPP",
                ));
            }
            let mut states = Vec::new();
            let mut by_name = HashMap::new();
            for st in &s.state {
                let sname = st.name.get_ref();
                if by_name.contains_key(sname) {
                    self.diags.push(cx.diag(
                        st.name.span(),
                        format!("duplicate state `{sname}` in system `{name}`"),
                    ));
                    continue;
                }
                if !valid_token(sname) {
                    self.diags.push(cx.diag(
                        st.name.span(),
                        format!(
                            "invalid state name `{sname}`: use lowercase letters, digits and _"
                        ),
                    ));
                    continue;
                }
                let canon = match canonical.iter().position(|c| c == st.canonical.get_ref()) {
                    Some(i) => i,
                    None => {
                        self.diags.push(cx.diag(
                            st.canonical.span(),
                            format!(
                                "unknown canonical state `{}`; valid: {}",
                                st.canonical.get_ref(),
                                list(canonical.iter())
                            ),
                        ));
                        0
                    }
                };
                let emit = self.emit(&cx, protocol, sname, &st.emit);
                by_name.insert(sname.clone(), StateId(states.len() as u16));
                states.push(StateDef {
                    name: sname.as_str().into(),
                    canonical: canon,
                    emit,
                });
            }
            if states.is_empty() {
                self.diags
                    .push(cx.diag(s.name.span(), format!("system `{name}` defines no states")));
            }
            let id = SystemId(systems.len() as u16);
            sys_index.insert(name.clone(), id);
            systems.push(System {
                name: name.as_str().into(),
                description: s.description.clone(),
                protocol,
                role,
                states,
                decode: Vec::new(),
                from_canonical: Vec::new(),
                file: f.rel.clone(),
                by_name,
            });
        }
        for (f, s) in &parsed {
            let cx = Ctx { file: f };
            let Some(&id) = sys_index.get(s.name.get_ref()) else {
                continue;
            };
            if systems[usize::from(id.0)].file != f.rel {
                continue; // a duplicate definition, already reported
            }
            let decode = self.decode_rules(&cx, &systems[usize::from(id.0)], s);
            let from_canonical =
                self.canonical_cells(&cx, &systems[usize::from(id.0)], &canonical, s);
            let sys = &mut systems[usize::from(id.0)];
            sys.decode = decode;
            sys.from_canonical = from_canonical;
        }

        // Tables.
        let mut tables: Vec<Table> = Vec::new();
        let mut pair_owner: HashMap<(SystemId, SystemId), (String, usize)> = HashMap::new();
        for f in &table_files {
            let Some(t) = self.parse::<TableFile>(f) else {
                continue;
            };
            let cx = Ctx { file: f };
            let names_broken = std::iter::once(&t.from)
                .chain(t.to.get_ref())
                .any(|n| broken.contains(n.get_ref()));
            if names_broken {
                continue;
            }
            if let Some(table) = self.table(&cx, &systems, &sys_index, &t, &mut pair_owner) {
                tables.push(table);
            }
        }

        if !self.diags.is_empty() {
            return Err(Diagnostics(self.diags));
        }
        let routes = resolve_routes(&systems, &tables);
        Ok(MappingSet {
            canonical,
            systems,
            tables,
            sys_index,
            routes,
            digest: digest(files),
        })
    }

    fn emit(&mut self, cx: &Ctx, protocol: Protocol, state: &str, e: &Spanned<EmitSpec>) -> Emit {
        let v = e.get_ref();
        match protocol {
            Protocol::Sip => {
                if v.availability.is_none() || v.basic.is_none() {
                    self.diags.push(cx.diag(
                        e.span(),
                        format!(
                            "state `{state}` of a sip system must emit both `availability` (msrtc) and `basic` (PIDF)"
                        ),
                    ));
                }
            }
            Protocol::Xmpp => {
                if v.show.is_none() && v.basic != Some(BasicSpec::Closed) {
                    self.diags.push(cx.diag(
                        e.span(),
                        format!(
                            "state `{state}` of an xmpp system must emit `show` (\"none\" for plain available) or basic = \"closed\""
                        ),
                    ));
                }
            }
        }
        Emit {
            availability: v.availability,
            activity: v.activity.clone(),
            basic: v.basic.map(basic_of),
            show: v.show.map(show_of),
            note: v.note.clone(),
        }
    }

    fn decode_rules(&mut self, cx: &Ctx, sys: &System, s: &SystemFile) -> Vec<DecodeRule> {
        let mut rules = Vec::new();
        let mut catch_all_seen: Option<usize> = None;
        for d in &s.decode {
            let m = d.matcher.get_ref();
            if let Some(line) = catch_all_seen {
                self.diags.push(cx.diag(
                    d.matcher.span(),
                    format!("unreachable decode rule: the rule at line {line} already matches everything"),
                ));
                continue;
            }
            if let Some([lo, hi]) = m.availability {
                if lo > hi {
                    self.diags.push(cx.diag(
                        d.matcher.span(),
                        format!("availability range [{lo}, {hi}] is empty (low > high)"),
                    ));
                }
            }
            let Some(state) = sys.state_id(d.state.get_ref()) else {
                self.diags.push(cx.diag(
                    d.state.span(),
                    format!(
                        "unknown state `{}` of system `{}`; valid: {}",
                        d.state.get_ref(),
                        sys.name,
                        list(sys.state_names())
                    ),
                ));
                continue;
            };
            if is_catch_all(m) {
                catch_all_seen = Some(cx.line(d.matcher.span()));
            }
            rules.push(DecodeRule {
                availability: m.availability.map(|[a, b]| (a, b)),
                activity: m.activity.as_ref().map(|a| a.to_lowercase()),
                basic: m.basic.map(basic_of),
                show: m.show.map(show_of),
                note: m.note.as_ref().map(|n| n.to_lowercase()),
                state,
            });
        }
        if catch_all_seen.is_none() {
            self.diags.push(cx.diag(
                s.name.span(),
                format!(
                    "decode rules of system `{}` are not total: end them with a rule `match = {{}}` that says \
                     what unrecognised presence means",
                    sys.name
                ),
            ));
        }
        rules
    }

    fn cell(&mut self, cx: &Ctx, sys: &System, r: &Spanned<StateRefSpec>) -> Option<Cell> {
        let v = r.get_ref();
        match sys.state_id(&v.state) {
            Some(state) => Some(Cell {
                state,
                note: v.note.as_deref().map(Arc::from),
                policy: v.note_policy.unwrap_or_default(),
            }),
            None => {
                self.diags.push(cx.diag(
                    r.span(),
                    format!(
                        "unknown state `{}` of system `{}`; valid: {}",
                        v.state,
                        sys.name,
                        list(sys.state_names())
                    ),
                ));
                None
            }
        }
    }

    fn canonical_cells(
        &mut self,
        cx: &Ctx,
        sys: &System,
        canonical: &[String],
        s: &SystemFile,
    ) -> Vec<Cell> {
        let map = s.from_canonical.get_ref();
        for key in map.keys() {
            if !canonical.contains(key) {
                let span = map
                    .get(key)
                    .map(|v| v.span())
                    .unwrap_or_else(|| s.from_canonical.span());
                self.diags.push(cx.diag(
                    span,
                    format!(
                        "unknown canonical state `{key}`; valid: {}",
                        list(canonical.iter())
                    ),
                ));
            }
        }
        let missing: Vec<&String> = canonical.iter().filter(|c| !map.contains_key(*c)).collect();
        if !missing.is_empty() {
            self.diags.push(cx.diag(
                s.from_canonical.span(),
                format!(
                    "from_canonical of system `{}` is not total: no state for canonical {}",
                    sys.name,
                    list(missing.iter())
                ),
            ));
        }
        let mut out = Vec::new();
        for c in canonical {
            let cell = map.get(c).and_then(|r| self.cell(cx, sys, r));
            // A placeholder keeps indexes aligned; the set is refused anyway when it is used.
            out.push(cell.unwrap_or(Cell {
                state: StateId(0),
                note: None,
                policy: NotePolicy::Prefix,
            }));
        }
        out
    }

    fn table(
        &mut self,
        cx: &Ctx,
        systems: &[System],
        sys_index: &HashMap<String, SystemId>,
        t: &TableFile,
        pair_owner: &mut HashMap<(SystemId, SystemId), (String, usize)>,
    ) -> Option<Table> {
        let valid_systems = || list(systems.iter().map(|s| &*s.name));
        let lookup = |b: &mut Builder, n: &Spanned<String>| match sys_index.get(n.get_ref()) {
            Some(id) => Some(*id),
            None => {
                b.diags.push(cx.diag(
                    n.span(),
                    format!(
                        "unknown system `{}`; valid: {}",
                        n.get_ref(),
                        valid_systems()
                    ),
                ));
                None
            }
        };
        let from = lookup(self, &t.from);
        let mut to = Vec::new();
        let mut ok = from.is_some();
        for n in t.to.get_ref() {
            match lookup(self, n) {
                Some(id) if Some(id) == from => {
                    self.diags
                        .push(cx.diag(n.span(), "a table cannot map a system to itself"));
                    ok = false;
                }
                Some(id) if to.contains(&id) => {
                    self.diags.push(cx.diag(
                        n.span(),
                        format!("system `{}` is listed twice in `to`", n.get_ref()),
                    ));
                    ok = false;
                }
                Some(id) => to.push(id),
                None => ok = false,
            }
        }
        if t.to.get_ref().is_empty() {
            self.diags
                .push(cx.diag(t.to.span(), "`to` names no target system"));
            ok = false;
        }
        let from = from?;
        if !ok {
            return None;
        }
        let title_line = cx.line(t.title.span());
        for (i, &target) in to.iter().enumerate() {
            let key = (from, target);
            if let Some((file, line)) = pair_owner.get(&key) {
                self.diags.push(cx.diag(
                    t.to.get_ref()[i].span(),
                    format!(
                        "contradicting tables: {file}:{line} already maps {} -> {}",
                        systems[usize::from(from.0)].name,
                        systems[usize::from(target.0)].name
                    ),
                ));
            } else {
                pair_owner.insert(key, (cx.file.path.display().to_string(), title_line));
            }
        }
        let src = &systems[usize::from(from.0)];
        let mut rows: Vec<Row> = Vec::new();
        for r in &t.row {
            let fs = r.from.get_ref();
            if fs.note_policy.is_some() {
                self.diags.push(cx.diag(
                    r.from.span(),
                    "`note_policy` belongs in a target cell, not in `from`",
                ));
            }
            let Some(from_state) = src.state_id(&fs.state) else {
                self.diags.push(cx.diag(
                    r.from.span(),
                    format!(
                        "unknown state `{}` of system `{}`; valid: {}",
                        fs.state,
                        src.name,
                        list(src.state_names())
                    ),
                ));
                continue;
            };
            let cells_map = r.to.get_ref();
            for k in cells_map.keys() {
                if !to.iter().any(|id| *systems[usize::from(id.0)].name == **k) {
                    let span = cells_map
                        .get(k)
                        .map(|v| v.span())
                        .unwrap_or_else(|| r.to.span());
                    self.diags.push(cx.diag(
                        span,
                        format!(
                            "`{k}` is not a target of this table; targets: {}",
                            list(to.iter().map(|id| &*systems[usize::from(id.0)].name))
                        ),
                    ));
                }
            }
            let mut cells = Vec::new();
            let mut row_ok = true;
            for &target in &to {
                let tsys = &systems[usize::from(target.0)];
                match cells_map.get(&*tsys.name) {
                    Some(c) => match self.cell(cx, tsys, c) {
                        Some(c) => cells.push(c),
                        None => row_ok = false,
                    },
                    None => {
                        self.diags.push(cx.diag(
                            r.to.span(),
                            format!(
                                "row for `{}` names no state for target `{}`",
                                fs.state, tsys.name
                            ),
                        ));
                        row_ok = false;
                    }
                }
            }
            if !row_ok {
                continue;
            }
            let row = Row {
                from: from_state,
                from_note: fs.note.as_ref().map(|n| n.to_lowercase()),
                from_note_display: fs.note.clone(),
                cells,
                line: cx.line(r.from.span()),
            };
            if let Some(prev) = rows
                .iter()
                .find(|p| p.from == row.from && p.from_note == row.from_note)
            {
                let what = match &fs.note {
                    Some(n) => format!("`{}` with note \"{n}\"", fs.state),
                    None => format!("`{}`", fs.state),
                };
                let msg = if prev.cells == row.cells {
                    format!(
                        "duplicate row: {what} is already mapped at line {}",
                        prev.line
                    )
                } else {
                    format!(
                        "contradicting rows: {what} is mapped differently at line {}",
                        prev.line
                    )
                };
                self.diags.push(cx.diag(r.from.span(), msg));
                continue;
            }
            rows.push(row);
        }
        let fallback = matches!(
            t.fallback.as_ref().map(|f| *f.get_ref()),
            Some(Fallback::Canonical)
        );
        if !fallback {
            let uncovered: Vec<&str> = src
                .states
                .iter()
                .enumerate()
                .filter(|(i, _)| {
                    !rows
                        .iter()
                        .any(|r| usize::from(r.from.0) == *i && r.from_note.is_none())
                })
                .map(|(_, s)| &*s.name)
                .collect();
            if !uncovered.is_empty() {
                self.diags.push(cx.diag(
                    t.from.span(),
                    format!(
                        "table is not total: no row for state {} of system `{}`; add rows or set \
                         fallback = \"canonical\"",
                        list(uncovered.iter()),
                        src.name
                    ),
                ));
            }
        }
        Some(Table {
            title: t.title.get_ref().clone(),
            file: cx.file.rel.clone(),
            line: title_line,
            from,
            to,
            fallback,
            rows,
        })
    }
}

/// The name a system file that failed to parse was meant to define: its `name` if the file is
/// at least TOML, else the file stem.
fn broken_system_name(f: &SourceFile) -> String {
    toml::from_str::<toml::Table>(&f.text)
        .ok()
        .and_then(|t| t.get("name").and_then(|v| v.as_str()).map(str::to_string))
        .unwrap_or_else(|| {
            Path::new(&f.rel)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
}

fn digest(files: &[SourceFile]) -> String {
    use sha1::{Digest, Sha1};
    let mut sorted: Vec<&SourceFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.rel.cmp(&b.rel));
    let mut h = Sha1::new();
    for f in sorted {
        h.update(f.rel.as_bytes());
        h.update([0]);
        h.update(f.text.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn valid_system_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Precomputes the route of every (source system, target system, source state).
fn resolve_routes(systems: &[System], tables: &[Table]) -> Vec<Vec<PairRoutes>> {
    let n = systems.len();
    let mut routes = vec![vec![PairRoutes::default(); n]; n];
    for (fi, from) in systems.iter().enumerate() {
        for (ti, to) in systems.iter().enumerate() {
            let pr = &mut routes[fi][ti];
            let table = tables.iter().enumerate().find(|(_, t)| {
                usize::from(t.from.0) == fi && t.to.iter().any(|x| usize::from(x.0) == ti)
            });
            pr.by_state =
                from.states
                    .iter()
                    .enumerate()
                    .map(|(si, st)| {
                        if fi == ti {
                            return Some(Resolved {
                                cell: Cell {
                                    state: StateId(si as u16),
                                    note: None,
                                    policy: NotePolicy::Prefix,
                                },
                                via: Via::Identity,
                            });
                        }
                        if let Some((tix, t)) = table {
                            let col =
                                t.to.iter()
                                    .position(|x| usize::from(x.0) == ti)
                                    .unwrap_or(0);
                            if let Some((rix, r)) =
                                t.rows.iter().enumerate().find(|(_, r)| {
                                    usize::from(r.from.0) == si && r.from_note.is_none()
                                })
                            {
                                return Some(Resolved {
                                    cell: r.cells[col].clone(),
                                    via: Via::Row {
                                        table: tix,
                                        row: rix,
                                    },
                                });
                            }
                        }
                        let fallback_of = table.map(|(tix, _)| tix);
                        Some(Resolved {
                            cell: to.from_canonical[st.canonical].clone(),
                            via: Via::Canonical {
                                canonical: st.canonical,
                                fallback_of,
                            },
                        })
                    })
                    .collect();
            if let Some((tix, t)) = table {
                let col =
                    t.to.iter()
                        .position(|x| usize::from(x.0) == ti)
                        .unwrap_or(0);
                for (rix, r) in t.rows.iter().enumerate() {
                    if let Some(note) = &r.from_note {
                        pr.note_rows.push((
                            r.from,
                            note.clone(),
                            Resolved {
                                cell: r.cells[col].clone(),
                                via: Via::Row {
                                    table: tix,
                                    row: rix,
                                },
                            },
                        ));
                    }
                }
            }
        }
    }
    routes
}

/// Reads a mapping directory: `canonical.toml`, `systems/*.toml`, `tables/*.toml` (sorted).
pub fn read_dir(root: &Path) -> Result<Vec<SourceFile>, Diagnostics> {
    let mut files = Vec::new();
    let mut diags = Vec::new();
    let read = |path: PathBuf, rel: String| match std::fs::read_to_string(&path) {
        Ok(text) => Ok(SourceFile { path, rel, text }),
        Err(e) => Err(Diagnostic::new(&path, 0, 0, format!("cannot read: {e}"))),
    };
    let mut take = |r: Result<SourceFile, Diagnostic>, diags: &mut Vec<Diagnostic>| match r {
        Ok(f) => files.push(f),
        Err(d) => diags.push(d),
    };
    take(
        read(root.join("canonical.toml"), "canonical.toml".into()),
        &mut diags,
    );
    for sub in ["systems", "tables"] {
        let dir = root.join(sub);
        let mut names: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect(),
            Err(e) => {
                diags.push(Diagnostic::new(
                    &dir,
                    0,
                    0,
                    format!("cannot read directory: {e}"),
                ));
                continue;
            }
        };
        names.sort();
        for p in names {
            let rel = format!(
                "{sub}/{}",
                p.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            );
            take(read(p, rel), &mut diags);
        }
    }
    if diags.is_empty() {
        Ok(files)
    } else {
        Err(Diagnostics(diags))
    }
}

impl MappingSet {
    /// The note-qualified rows that apply to `from -> to` (source state, note as written).
    pub fn pair_note_rows(&self, from: SystemId, to: SystemId) -> Vec<(StateId, &str)> {
        self.pair(from, to)
            .note_rows
            .iter()
            .filter_map(|(st, _, res)| match res.via {
                Via::Row { table, row } => self.tables[table].rows[row]
                    .from_note_display
                    .as_deref()
                    .map(|n| (*st, n)),
                _ => None,
            })
            .collect()
    }
}
