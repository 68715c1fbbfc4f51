//! Outbound target resolution against a real DNS server on loopback: Debian's dnsmasq, started
//! per test on a random port with the records the test needs, killed on drop. Never real DNS.
//! A missing dnsmasq fails the tests loudly (install `dnsmasq-base`); they never skip.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::common::dnsmasq::{self, DnsRecord};
use legate::config::{Domain, HostPort};
use legate::dns::{DnsError, DnsSettings, Resolver, Target, TargetSource, Transport};

const T: Duration = Duration::from_secs(30);

/// A dnsmasq serving only what the test gives it (dnsmasq options as written on its command
/// line), authoritative-ish for `.test`: names under `test` that it does not know get NXDOMAIN
/// (`--local=/test/`), nothing is forwarded. The shared harness (`common::dnsmasq`) runs it.
struct Dnsmasq {
    inner: dnsmasq::Dnsmasq,
    addr: SocketAddr,
}

impl Dnsmasq {
    fn start(records: &[&str]) -> Self {
        let records: Vec<DnsRecord> = records
            .iter()
            .map(|r| DnsRecord::Raw(r.to_string()))
            .collect();
        let inner = dnsmasq::Dnsmasq::start(&records).unwrap_or_else(|e| panic!("{e:#}"));
        let addr = inner.addr();
        Self { inner, addr }
    }

    fn resolver(&self) -> Resolver {
        self.resolver_with_map(&[])
    }

    fn resolver_with_map(&self, map: &[(Domain, IpAddr)]) -> Resolver {
        let settings = DnsSettings {
            nameservers: Some(vec![self.addr]),
            timeout: Duration::from_secs(2),
            attempts: 1,
            ..DnsSettings::default()
        };
        Resolver::new(&settings, map).expect("resolver")
    }

    /// How many queries of `qtype` for `name` dnsmasq has logged (`query[SRV] name from ...`).
    fn queries(&self, qtype: &str, name: &str) -> usize {
        let needle = format!("query[{qtype}] {name} from");
        self.inner
            .log()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }

    /// Waits until dnsmasq logged at least `n` such queries (its log is written as it
    /// answers, but give the write a moment).
    async fn wait_queries(&self, qtype: &str, name: &str, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let c = self.queries(qtype, name);
            if c >= n || Instant::now() > deadline {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn dom(s: &str) -> Domain {
    Domain::parse(s).expect("domain")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket addr")
}

fn addrs(ts: &[Target]) -> Vec<SocketAddr> {
    ts.iter().map(|t| t.addr).collect()
}

/// partner.test: Microsoft federation SRV with two priorities; the second target has two
/// addresses. route.partner.test: a static-route host.
const PARTNER: &[&str] = &[
    "--srv-host=_sipfederationtls._tcp.partner.test,sip1.partner.test,5061,10,50",
    "--srv-host=_sipfederationtls._tcp.partner.test,sip2.partner.test,5062,20,50",
    "--host-record=sip1.partner.test,127.0.0.11",
    "--host-record=sip2.partner.test,127.0.0.12",
    "--host-record=sip2.partner.test,127.0.0.13",
    "--host-record=route.partner.test,127.0.0.41",
    // Also published the RFC 3263 way: must not be used while the MS record exists.
    "--srv-host=_sips._tcp.partner.test,other.partner.test,5061,0,0",
    "--host-record=other.partner.test,127.0.0.99",
];

#[tokio::test]
async fn sip_srv_priority_order_and_every_address_for_failover() {
    tokio::time::timeout(T, async {
        let dns = Dnsmasq::start(PARTNER);
        let r = dns.resolver();
        let t = r
            .sip_targets(&dom("partner.test"), None)
            .await
            .expect("targets");
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!(t[0].addr, sa("127.0.0.11:5061"));
        assert_eq!(t[0].host, "sip1.partner.test");
        let mut rest = addrs(&t[1..]);
        rest.sort();
        assert_eq!(rest, vec![sa("127.0.0.12:5062"), sa("127.0.0.13:5062")]);
        assert!(t
            .iter()
            .all(|t| t.transport == Transport::Tls && t.source == TargetSource::Srv));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn srv_weights_decide_order_within_a_priority() {
    tokio::time::timeout(T, async {
        let dns = Dnsmasq::start(&[
            "--srv-host=_sipfederationtls._tcp.weighted.test,zero.weighted.test,5061,10,0",
            "--srv-host=_sipfederationtls._tcp.weighted.test,heavy.weighted.test,5061,10,100",
            "--host-record=zero.weighted.test,127.0.0.51",
            "--host-record=heavy.weighted.test,127.0.0.52",
        ]);
        let r = dns.resolver();
        let mut heavy_first = 0;
        for _ in 0..50 {
            let t = r
                .sip_targets(&dom("weighted.test"), None)
                .await
                .expect("targets");
            assert_eq!(t.len(), 2);
            if t[0].addr == sa("127.0.0.52:5061") {
                heavy_first += 1;
            }
        }
        // P(zero first) = 1/101 per lookup (RFC 2782).
        assert!(heavy_first >= 45, "heavy first only {heavy_first}/50");
        // Answers were cached: one SRV query for 50 lookups.
        assert_eq!(
            dns.wait_queries("SRV", "_sipfederationtls._tcp.weighted.test", 1)
                .await,
            1
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn sip_naptr_then_srv_then_address_fallback() {
    tokio::time::timeout(T, async {
        let dns = Dnsmasq::start(&[
            // RFC 3263 NAPTR: TLS preferred (order 10), TCP after (order 20), UDP ignored.
            "--naptr-record=naptr.test,20,10,s,SIP+D2T,,_sip._tcp.naptr.test",
            "--naptr-record=naptr.test,10,10,s,SIPS+D2T,,_sips._tcp.naptr.test",
            "--naptr-record=naptr.test,5,10,s,SIP+D2U,,_sip._udp.naptr.test",
            "--srv-host=_sips._tcp.naptr.test,tls.naptr.test,5071,0,0",
            "--srv-host=_sip._tcp.naptr.test,tcp.naptr.test,5060,0,0",
            "--srv-host=_sip._udp.naptr.test,udp.naptr.test,5060,0,0",
            "--host-record=tls.naptr.test,127.0.0.21",
            "--host-record=tcp.naptr.test,127.0.0.22",
            "--host-record=udp.naptr.test,127.0.0.23",
            // No NAPTR: _sips._tcp then _sip._tcp.
            "--srv-host=_sip._tcp.plain.test,tcp.plain.test,5060,0,0",
            "--srv-host=_sips._tcp.plain.test,tls.plain.test,5061,0,0",
            "--host-record=tcp.plain.test,127.0.0.26",
            "--host-record=tls.plain.test,127.0.0.25",
            // Nothing but an address.
            "--host-record=bare.test,127.0.0.31",
        ]);
        let r = dns.resolver();

        let t = r
            .sip_targets(&dom("naptr.test"), None)
            .await
            .expect("naptr");
        assert_eq!(
            addrs(&t),
            vec![sa("127.0.0.21:5071"), sa("127.0.0.22:5060")]
        );
        assert_eq!(t[0].transport, Transport::Tls);
        assert_eq!(t[1].transport, Transport::Tcp);
        assert!(t.iter().all(|t| t.source == TargetSource::Naptr));

        let t = r.sip_targets(&dom("plain.test"), None).await.expect("srv");
        assert_eq!(
            addrs(&t),
            vec![sa("127.0.0.25:5061"), sa("127.0.0.26:5060")]
        );
        assert_eq!(
            t.iter().map(|t| t.transport).collect::<Vec<_>>(),
            vec![Transport::Tls, Transport::Tcp]
        );

        let t = r.sip_targets(&dom("bare.test"), None).await.expect("A");
        assert_eq!(addrs(&t), vec![sa("127.0.0.31:5061")]);
        assert_eq!(t[0].transport, Transport::Tls);
        assert_eq!(t[0].source, TargetSource::AddressFallback);

        let e = r
            .sip_targets(&dom("nowhere.test"), None)
            .await
            .expect_err("nothing");
        assert!(matches!(e, DnsError::NxDomain { .. }), "{e}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn static_route_wins_over_dns() {
    tokio::time::timeout(T, async {
        let dns = Dnsmasq::start(PARTNER);
        let r = dns.resolver();
        let route = HostPort::parse("route.partner.test:5070").expect("route");
        let t = r
            .sip_targets(&dom("partner.test"), Some(&route))
            .await
            .expect("route");
        assert_eq!(addrs(&t), vec![sa("127.0.0.41:5070")]);
        assert_eq!(t[0].source, TargetSource::StaticRoute);
        assert_eq!(t[0].transport, Transport::Tls);
        let ip = HostPort::parse("192.0.2.9:5061").expect("route");
        let t = r
            .sip_targets(&dom("partner.test"), Some(&ip))
            .await
            .expect("ip");
        assert_eq!(addrs(&t), vec![sa("192.0.2.9:5061")]);
        // No SRV question was asked for the routed domain.
        assert_eq!(dns.queries("SRV", "_sipfederationtls._tcp.partner.test"), 0);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn cluster_address_map_is_consulted_before_dns_and_reloads() {
    tokio::time::timeout(T, async {
        let dns = Dnsmasq::start(PARTNER);
        let mapped: IpAddr = "10.9.9.9".parse().expect("ip");
        let r = dns.resolver_with_map(&[(dom("sip1.partner.test"), mapped)]);
        let t = r
            .sip_targets(&dom("partner.test"), None)
            .await
            .expect("targets");
        assert_eq!(t[0].addr, SocketAddr::new(mapped, 5061));
        assert_eq!(r.lookup_ips("SIP1.partner.test.").await, Ok(vec![mapped]));
        // The mapped name never reached DNS; the unmapped one did.
        dns.wait_queries("A", "sip2.partner.test", 1).await;
        assert_eq!(dns.queries("A", "sip1.partner.test"), 0);
        assert_eq!(dns.queries("AAAA", "sip1.partner.test"), 0);

        // Static-route hosts go through the map too.
        let route = HostPort::parse("route.partner.test:5070").expect("route");
        r.set_address_map(&[(dom("route.partner.test"), mapped)]);
        let t = r
            .sip_targets(&dom("partner.test"), Some(&route))
            .await
            .expect("route");
        assert_eq!(addrs(&t), vec![SocketAddr::new(mapped, 5070)]);

        // Reload replaced the table: sip1 is back to its DNS address.
        let t = r
            .sip_targets(&dom("partner.test"), None)
            .await
            .expect("targets");
        assert_eq!(t[0].addr, sa("127.0.0.11:5061"));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn xmpp_s2s_merges_direct_tls_and_starttls_records() {
    tokio::time::timeout(T, async {
        let dns = Dnsmasq::start(&[
            "--srv-host=_xmpps-server._tcp.xmpp.test,direct.xmpp.test,5270,5,0",
            "--srv-host=_xmpp-server._tcp.xmpp.test,s2s.xmpp.test,5269,10,0",
            "--srv-host=_xmpp-server._tcp.xmpp.test,backup.xmpp.test,5269,20,0",
            "--host-record=direct.xmpp.test,127.0.0.61",
            "--host-record=s2s.xmpp.test,127.0.0.62",
            "--host-record=backup.xmpp.test,127.0.0.63",
            // Only STARTTLS.
            "--srv-host=_xmpp-server._tcp.old.test,xmpp.old.test,5269,0,0",
            "--host-record=xmpp.old.test,127.0.0.64",
            // No SRV at all.
            "--host-record=bare.test,127.0.0.31",
            // `.`: no s2s here, even though the name has an address.
            "--srv-host=_xmpp-server._tcp.nos2s.test",
            "--host-record=nos2s.test,127.0.0.65",
            // Components of a home node.
            "--srv-host=_xmpp-component._tcp.home.test,node2.home.test,5347,20,0",
            "--srv-host=_xmpp-component._tcp.home.test,node1.home.test,5347,10,0",
            "--host-record=node1.home.test,127.0.0.71",
            "--host-record=node2.home.test,127.0.0.72",
        ]);
        let r = dns.resolver();

        let t = r.xmpp_s2s_targets(&dom("xmpp.test")).await.expect("s2s");
        assert_eq!(
            addrs(&t),
            vec![
                sa("127.0.0.61:5270"),
                sa("127.0.0.62:5269"),
                sa("127.0.0.63:5269")
            ]
        );
        assert_eq!(
            t.iter().map(|t| t.transport).collect::<Vec<_>>(),
            vec![Transport::Tls, Transport::Tcp, Transport::Tcp]
        );

        let t = r.xmpp_s2s_targets(&dom("old.test")).await.expect("s2s");
        assert_eq!(addrs(&t), vec![sa("127.0.0.64:5269")]);

        let t = r.xmpp_s2s_targets(&dom("bare.test")).await.expect("A");
        assert_eq!(addrs(&t), vec![sa("127.0.0.31:5269")]);
        assert_eq!(t[0].source, TargetSource::AddressFallback);
        assert_eq!(t[0].transport, Transport::Tcp);

        let e = r
            .xmpp_s2s_targets(&dom("nos2s.test"))
            .await
            .expect_err("not offered");
        assert!(matches!(e, DnsError::ServiceNotOffered { .. }), "{e}");
        assert_eq!(e.label(), "service_not_offered");
        assert_eq!(
            dns.queries("A", "nos2s.test"),
            0,
            "no address fallback after `.`"
        );

        let t = r
            .component_targets(&dom("home.test"))
            .await
            .expect("component");
        assert_eq!(
            addrs(&t),
            vec![sa("127.0.0.71:5347"), sa("127.0.0.72:5347")]
        );
        let e = r
            .component_targets(&dom("nohome.test"))
            .await
            .expect_err("none");
        assert!(matches!(e, DnsError::NxDomain { .. }), "{e}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn answers_and_missing_names_are_cached() {
    tokio::time::timeout(T, async {
        let dns = Dnsmasq::start(PARTNER);
        let r = dns.resolver();
        for _ in 0..3 {
            r.sip_targets(&dom("partner.test"), None)
                .await
                .expect("targets");
        }
        assert_eq!(
            dns.wait_queries("SRV", "_sipfederationtls._tcp.partner.test", 1)
                .await,
            1
        );
        assert_eq!(dns.queries("A", "sip1.partner.test"), 1);

        // NXDOMAIN is cached too (negative caching, bounded by negative_ttl_min/max).
        for _ in 0..3 {
            let e = r
                .sip_targets(&dom("missing.test"), None)
                .await
                .expect_err("missing");
            assert!(matches!(e, DnsError::NxDomain { .. }), "{e}");
        }
        let n = dns
            .wait_queries("SRV", "_sipfederationtls._tcp.missing.test", 1)
            .await;
        assert_eq!(
            n, 1,
            "the second lookup of a missing name must not reach the server"
        );
        assert_eq!(dns.queries("NAPTR", "missing.test"), 1);

        // Control: with negative caching off, every lookup of the missing name reaches the
        // server (so the count above is meaningful).
        let uncached = Resolver::new(
            &DnsSettings {
                nameservers: Some(vec![dns.addr]),
                negative_ttl_min: Duration::ZERO,
                negative_ttl_max: Duration::ZERO,
                ..DnsSettings::default()
            },
            &[],
        )
        .expect("resolver");
        for _ in 0..2 {
            let _ = uncached.sip_targets(&dom("missing.test"), None).await;
        }
        assert_eq!(
            dns.wait_queries("SRV", "_sipfederationtls._tcp.missing.test", 3)
                .await,
            3
        );

        // Flushing the cache asks again.
        r.clear_cache();
        let _ = r.sip_targets(&dom("missing.test"), None).await;
        assert_eq!(
            dns.wait_queries("SRV", "_sipfederationtls._tcp.missing.test", 4)
                .await,
            4
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_dead_server_fails_with_a_bounded_error() {
    tokio::time::timeout(T, async {
        // Nothing listens on this port.
        let port = crate::common::ports::free_local_port();
        let settings = DnsSettings {
            nameservers: Some(vec![SocketAddr::from(([127, 0, 0, 1], port))]),
            timeout: Duration::from_millis(300),
            attempts: 1,
            ..DnsSettings::default()
        };
        let r = Resolver::new(&settings, &[]).expect("resolver");
        let start = Instant::now();
        let e = r
            .sip_targets(&dom("partner.test"), None)
            .await
            .expect_err("dead server");
        assert!(
            matches!(e, DnsError::Timeout { .. } | DnsError::Io { .. }),
            "{e:?}"
        );
        eprintln!("dead server: {e} after {:?}", start.elapsed());
        // It stopped at the first step instead of timing out through every fallback.
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    })
    .await
    .expect("test timed out");
}

#[test]
#[should_panic(expected = "install the Debian package `dnsmasq-base`")]
fn a_missing_dnsmasq_fails_loudly() {
    // What `dnsmasq::Dnsmasq::start` runs first, with a path that cannot exist.
    let _ = crate::common::programs::require_program("/nonexistent/sbin/dnsmasq", "dnsmasq-base");
}

#[tokio::test]
async fn srv_targets_without_address_are_skipped_and_dual_stack_kept() {
    tokio::time::timeout(T, async {
        let dns = Dnsmasq::start(&[
            "--srv-host=_sipfederationtls._tcp.ghost.test,gone.ghost.test,5061,10,0",
            "--srv-host=_sipfederationtls._tcp.ghost.test,real.ghost.test,5061,20,0",
            "--host-record=real.ghost.test,127.0.0.91,::1",
            "--srv-host=_sipfederationtls._tcp.allgone.test,gone.allgone.test,5061,10,0",
        ]);
        let r = dns.resolver();
        let t = r
            .sip_targets(&dom("ghost.test"), None)
            .await
            .expect("targets");
        let mut got = addrs(&t);
        got.sort();
        assert_eq!(got, vec![sa("127.0.0.91:5061"), sa("[::1]:5061")]);
        assert!(t.iter().all(|t| t.host == "real.ghost.test"));

        let e = r
            .sip_targets(&dom("allgone.test"), None)
            .await
            .expect_err("no target resolves");
        assert!(matches!(e, DnsError::NoAddresses { .. }), "{e}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn sip_services_marked_not_offered() {
    tokio::time::timeout(T, async {
        let dns = Dnsmasq::start(&[
            // Microsoft's "we do not federate": final, no RFC 3263 or address guess.
            "--srv-host=_sipfederationtls._tcp.nofed.test",
            "--host-record=nofed.test,127.0.0.95",
            // No TLS, but TCP offered.
            "--srv-host=_sips._tcp.tcponly.test",
            "--srv-host=_sip._tcp.tcponly.test,sip.tcponly.test,5060,0,0",
            "--host-record=sip.tcponly.test,127.0.0.96",
            // Nothing offered at all.
            "--srv-host=_sips._tcp.nosip.test",
            "--srv-host=_sip._tcp.nosip.test",
            "--host-record=nosip.test,127.0.0.97",
        ]);
        let r = dns.resolver();
        let e = r
            .sip_targets(&dom("nofed.test"), None)
            .await
            .expect_err("nofed");
        assert!(matches!(e, DnsError::ServiceNotOffered { .. }), "{e}");
        assert_eq!(dns.queries("NAPTR", "nofed.test"), 0);

        let t = r
            .sip_targets(&dom("tcponly.test"), None)
            .await
            .expect("tcp");
        assert_eq!(addrs(&t), vec![sa("127.0.0.96:5060")]);
        assert_eq!(t[0].transport, Transport::Tcp);

        let e = r
            .sip_targets(&dom("nosip.test"), None)
            .await
            .expect_err("nosip");
        assert!(matches!(e, DnsError::ServiceNotOffered { .. }), "{e}");
        assert_eq!(dns.queries("A", "nosip.test"), 0);
    })
    .await
    .expect("test timed out");
}
