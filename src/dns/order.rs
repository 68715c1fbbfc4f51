//! Pure ordering rules for service records: RFC 2782 SRV selection (priority, then
//! weighted-random) and RFC 3403 / RFC 3263 §4.1 NAPTR selection. No I/O; the random source is
//! a parameter so tests can fix it.

use rand::Rng;

/// One SRV record as returned by DNS (RFC 2782), target without trailing dot, lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvRecord {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

/// Orders SRV records for connection attempts (RFC 2782, "Usage rules"): lowest priority first;
/// within one priority, repeatedly pick a record at random with probability proportional to
/// its weight, weight-0 records placed first so they keep "a very small chance" of going first.
pub fn order_srv<R: Rng + ?Sized>(records: Vec<SrvRecord>, rng: &mut R) -> Vec<SrvRecord> {
    order_srv_by(records, |r| r, rng)
}

/// `order_srv` over items that carry an SRV record (e.g. the record plus its transport).
pub fn order_srv_by<T, R: Rng + ?Sized>(
    mut items: Vec<T>,
    srv: impl Fn(&T) -> &SrvRecord,
    rng: &mut R,
) -> Vec<T> {
    items.sort_by_key(|i| srv(i).priority);
    let mut out = Vec::with_capacity(items.len());
    let mut rest = items.into_iter().peekable();
    while let Some(first) = rest.next() {
        let prio = srv(&first).priority;
        let mut group = vec![first];
        while let Some(i) = rest.next_if(|i| srv(i).priority == prio) {
            group.push(i);
        }
        // Stable: zero weights first, the others in DNS order.
        group.sort_by_key(|i| srv(i).weight != 0);
        while !group.is_empty() {
            let total: u32 = group.iter().map(|i| u32::from(srv(i).weight)).sum();
            let pick = rng.random_range(0..=total);
            let mut running = 0u32;
            let idx = group
                .iter()
                .position(|i| {
                    running += u32::from(srv(i).weight);
                    running >= pick
                })
                .unwrap_or(0);
            out.push(group.remove(idx));
        }
    }
    out
}

/// The transport a SIP NAPTR service field selects (RFC 3263 §4.1), for the two we speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NaptrService {
    /// `SIPS+D2T`: SIP over TLS over TCP.
    SipsD2t,
    /// `SIP+D2T`: SIP over TCP.
    SipD2t,
}

/// One NAPTR record, as far as RFC 3263 needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NaptrRecord {
    pub order: u16,
    pub preference: u16,
    pub flags: String,
    pub service: String,
    /// The SRV name to look up next (`_sips._tcp.example.com`), lowercased, no trailing dot.
    pub replacement: String,
}

/// The NAPTR records a SIP client may use, best first: flag `s` (the next step is an SRV
/// lookup), a service we speak, a non-empty replacement; sorted by order, then preference
/// (RFC 3403 §4.1). Records with other flags (`a`, `u`, regexps) are not for SIP (RFC 3263).
pub fn usable_naptr(mut records: Vec<NaptrRecord>) -> Vec<(NaptrService, String)> {
    records.sort_by_key(|r| (r.order, r.preference));
    records
        .into_iter()
        .filter(|r| r.flags.eq_ignore_ascii_case("s") && !r.replacement.is_empty())
        .filter_map(|r| {
            let svc = if r.service.eq_ignore_ascii_case("SIPS+D2T") {
                NaptrService::SipsD2t
            } else if r.service.eq_ignore_ascii_case("SIP+D2T") {
                NaptrService::SipD2t
            } else {
                return None;
            };
            Some((svc, r.replacement))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn srv(priority: u16, weight: u16, target: &str) -> SrvRecord {
        SrvRecord {
            priority,
            weight,
            port: 5061,
            target: target.into(),
        }
    }

    #[test]
    fn priority_first() {
        let mut rng = StdRng::seed_from_u64(1);
        let out = order_srv(
            vec![
                srv(20, 100, "c"),
                srv(10, 0, "a"),
                srv(30, 5, "d"),
                srv(10, 0, "b"),
            ],
            &mut rng,
        );
        let prios: Vec<u16> = out.iter().map(|r| r.priority).collect();
        assert_eq!(prios, vec![10, 10, 20, 30]);
        assert_eq!(out[2].target, "c");
    }

    #[test]
    fn weights_are_proportional() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut first_heavy = 0;
        let mut first_zero = 0;
        let n = 10_000;
        for _ in 0..n {
            let out = order_srv(
                vec![
                    srv(10, 0, "zero"),
                    srv(10, 10, "light"),
                    srv(10, 90, "heavy"),
                ],
                &mut rng,
            );
            assert_eq!(out.len(), 3);
            match out[0].target.as_str() {
                "heavy" => first_heavy += 1,
                "zero" => first_zero += 1,
                _ => {}
            }
        }
        // Expected ~ 90/101 and 1/101.
        assert!((8_500..9_300).contains(&first_heavy), "{first_heavy}");
        assert!(first_zero < 300, "{first_zero}");
    }

    #[test]
    fn all_zero_weights_all_kept() {
        let mut rng = StdRng::seed_from_u64(3);
        let out = order_srv(
            vec![srv(1, 0, "a"), srv(1, 0, "b"), srv(1, 0, "c")],
            &mut rng,
        );
        let mut t: Vec<_> = out.iter().map(|r| r.target.clone()).collect();
        t.sort();
        assert_eq!(t, vec!["a", "b", "c"]);
    }

    #[test]
    fn naptr_selection() {
        let rec = |order, preference, flags: &str, service: &str, repl: &str| NaptrRecord {
            order,
            preference,
            flags: flags.into(),
            service: service.into(),
            replacement: repl.into(),
        };
        let out = usable_naptr(vec![
            rec(20, 10, "s", "SIP+D2T", "_sip._tcp.x"),
            rec(10, 20, "s", "SIPS+D2T", "_sips._tcp.x"),
            rec(10, 10, "s", "SIP+D2U", "_sip._udp.x"),
            rec(5, 10, "u", "SIPS+D2T", "!^.*$!sips:x!"),
            rec(10, 30, "S", "sips+d2t", "_sips._tcp.y"),
        ]);
        assert_eq!(
            out,
            vec![
                (NaptrService::SipsD2t, "_sips._tcp.x".to_string()),
                (NaptrService::SipsD2t, "_sips._tcp.y".to_string()),
                (NaptrService::SipD2t, "_sip._tcp.x".to_string()),
            ]
        );
    }
}
