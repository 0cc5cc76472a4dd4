//! DNS-aware egress against the real kernel and a real resolver (dnsmasq, query log as
//! ground truth): allowed names resolve and connect, refused names never reach the
//! resolver by any route, answers teach addresses before the job reads them, entries expire,
//! forged answers teach nothing, and pinned state enforces without the engine. Needs root
//! and cgroup2; fails (never skips) without them.

mod common;

use std::time::Duration;

use common::{dnsmasq::Dnsmasq, listeners, own_ip, probe::Outcome, run_probe, test_cgroup};
use pipeguard::{
    cgroup::OwnedCgroup,
    engine::{Engine, EngineConfig, PolicyEntries},
    policy::{DomainPattern, DomainRule, Ports},
};
use pipeguard_common::{
    Hook, MODE_ENFORCE, POD_DENY_RAW_SOCKETS, POD_DNS_FILTERED, PROTO_TCP, PROTO_UDP, PodEntry,
    VERDICT_ALLOW, VERDICT_DENY,
};

#[test]
#[ignore = "the kernel tests' probe: runs only when re-executed by a test"]
fn probe_main() {
    common::probe::main();
}

const POLICY: u32 = 9;

fn rule(pattern: &str, port: u16) -> DomainRule {
    DomainRule {
        pattern: match pattern.strip_prefix("*.") {
            Some(suffix) => DomainPattern::Wildcard(suffix.into()),
            None => DomainPattern::Exact(pattern.into()),
        },
        ports: Ports::List(vec![(PROTO_TCP, port, port)]),
    }
}

/// The static allowlist: DNS (UDP and TCP 53) to `resolver_cidr` only.
fn dns_only(resolver_cidr: &str, names: Vec<DomainRule>) -> PolicyEntries {
    let mut entries = common::allow_only(resolver_cidr, 53, &[PROTO_UDP, PROTO_TCP]);
    entries.names = names;
    entries
}

struct Guarded {
    engine: Engine,
    cgroup: OwnedCgroup,
    cgroup_id: u64,
}

fn guard(name: &str, entries: &PolicyEntries, config: EngineConfig) -> Guarded {
    guard_pod(name, entries, config, POD_DENY_RAW_SOCKETS | POD_DNS_FILTERED)
}

fn guard_pod(name: &str, entries: &PolicyEntries, config: EngineConfig, flags: u32) -> Guarded {
    let cgroup = test_cgroup(name);
    let mut engine = Engine::load(&config).expect("load the eBPF programs");
    let cgroup_id = cgroup.id().unwrap();
    engine.put_policy(POLICY, entries).unwrap();
    engine
        .put_pod(
            cgroup_id,
            PodEntry {
                policy_id: POLICY,
                mode: MODE_ENFORCE,
                flags,
                ..PodEntry::default()
            },
        )
        .unwrap();
    engine.attach(cgroup.path()).expect("attach to the test cgroup");
    Guarded {
        engine,
        cgroup,
        cgroup_id,
    }
}

impl Guarded {
    fn probe(&self, actions: &[String]) -> Vec<Outcome> {
        let outcomes = run_probe(self.cgroup.path(), actions);
        assert_eq!(
            outcomes.len(),
            actions.len(),
            "one outcome per action: {outcomes:#?}"
        );
        outcomes
    }

    fn dns_count(&self, verdict: u8) -> u64 {
        self.engine
            .counters(self.cgroup_id)
            .unwrap()
            .iter()
            .filter(|(k, _)| k.hook == Hook::Dns as u8 && k.verdict == verdict)
            .map(|(_, c)| c.packets)
            .sum()
    }
}

fn assert_ok(o: &Outcome) {
    assert!(o.ok, "expected success for {o:?}");
}

fn assert_failed(o: &Outcome) {
    assert!(!o.ok, "expected a failure for {o:?}");
}

#[test]
fn allowed_names_resolve_and_connect_refused_names_never_reach_the_resolver() {
    let web = listeners::tcp("127.0.0.1:0");
    let port = web.addr.port();
    let ip = own_ip(53);
    let dns = Dnsmasq::start(
        "basic",
        &ip,
        "127.0.0.1 ok.pg.test\n127.0.0.1 secret.exfil.test\n127.0.0.1 deep.sub.wild.test\n127.0.0.1 wild.test\n",
        60,
    );
    let g = guard(
        "dns-basic",
        &dns_only(
            &format!("{ip}/32"),
            vec![rule("ok.pg.test", port), rule("*.wild.test", port)],
        ),
        EngineConfig::default(),
    );
    let r = dns.addr;
    let mut actions = vec![
        // Nothing taught the address yet: refused like any other.
        format!("tcp 127.0.0.1:{port} before-resolving"),
        format!("dns-connect {r} OK.pg.test {port} after-resolving"),
        format!("dns-connect {r} deep.sub.wild.test {port} wildcard"),
    ];
    for route in ["dns-udp", "dns-sendto", "dns-sendmsg", "dns-sendmmsg", "dns-tcp"] {
        actions.push(format!("{route} {r} ok.pg.test"));
    }
    for route in ["dns-udp", "dns-sendto", "dns-sendmsg", "dns-sendmmsg", "dns-tcp"] {
        actions.push(format!(
            "{route} {r} {}.secret.exfil.test",
            route.trim_start_matches("dns-")
        ));
    }
    // A wildcard never allows its own suffix.
    actions.push(format!("dns-udp {r} wild.test"));
    let out = g.probe(&actions);
    assert!(out[0].denied_with_eperm(), "{:?}", out[0]);
    assert_ok(&out[1]);
    assert_ok(&out[2]);
    assert!(web.received.wait_for(b"after-resolving", Duration::from_secs(3)));
    assert!(web.received.wait_for(b"wildcard", Duration::from_secs(3)));
    assert!(
        !web.received
            .wait_for(b"before-resolving", Duration::from_millis(200))
    );
    for o in &out[3..8] {
        assert_ok(o);
    }
    for o in &out[8..] {
        assert_failed(o);
    }
    // UDP refusals fail the send itself, at once.
    for o in &out[8..12] {
        assert!(o.denied_with_eperm(), "UDP query refusal is EPERM: {o:?}");
    }
    std::thread::sleep(Duration::from_millis(300));
    for route in ["udp", "sendto", "sendmsg", "sendmmsg", "tcp"] {
        assert!(
            !dns.saw(&format!("{route}.secret.exfil.test")),
            "{route} leaked:\n{}",
            dns.log()
        );
    }
    assert!(
        !dns.saw("wild.test"),
        "the wildcard's own suffix leaked:\n{}",
        dns.log()
    );
    assert!(
        dns.saw("ok.pg.test") && dns.saw("deep.sub.wild.test"),
        "{}",
        dns.log()
    );
    assert!(g.dns_count(VERDICT_ALLOW) >= 7, "allowed queries are counted");
    assert!(g.dns_count(VERDICT_DENY) >= 6, "refused queries are counted");
}

#[test]
fn a_query_is_counted_once_by_the_program_that_judged_it() {
    let ip = own_ip(82);
    let dns = Dnsmasq::start("count", &ip, "127.0.0.1 ok.pg.test\n", 60);
    let g = guard(
        "dns-count",
        &dns_only(&format!("{ip}/32"), vec![rule("ok.pg.test", 80)]),
        EngineConfig::default(),
    );
    let r = dns.addr;
    let out = g.probe(&[
        format!("dns-udp {r} ok.pg.test"),
        format!("dns-udp {r} no.exfil.test"),
    ]);
    assert_ok(&out[0]);
    assert_failed(&out[1]);
    // One datagram each: the DNS program's verdict, not also the IP policy's allow.
    let counters = g.engine.counters(g.cgroup_id).unwrap();
    let packets = |hook: Hook, verdict: u8| -> u64 {
        counters
            .iter()
            .filter(|(k, _)| k.hook == hook as u8 && k.verdict == verdict)
            .map(|(_, c)| c.packets)
            .sum()
    };
    assert_eq!(packets(Hook::Dns, VERDICT_ALLOW), 1, "{counters:?}");
    assert_eq!(packets(Hook::Dns, VERDICT_DENY), 1, "{counters:?}");
    assert_eq!(packets(Hook::Egress, VERDICT_ALLOW), 0, "{counters:?}");
}

#[test]
fn ipv4_mapped_and_ipv6_resolvers_are_filtered_too() {
    let web = listeners::tcp("127.0.0.1:0");
    let port = web.addr.port();
    let ip = own_ip(55);
    let v4 = Dnsmasq::start(
        "mapped",
        &ip,
        "127.0.0.1 ok.pg.test\n127.0.0.1 leak.exfil.test\n",
        60,
    );
    let v6 = Dnsmasq::start(
        "v6",
        "::1",
        "127.0.0.1 ok6.pg.test\n127.0.0.1 leak6.exfil.test\n",
        60,
    );
    let mut entries = dns_only(
        &format!("{ip}/32"),
        vec![rule("ok.pg.test", port), rule("ok6.pg.test", port)],
    );
    let v6_dns = common::allow_only("::1/128", 53, &[PROTO_UDP, PROTO_TCP]);
    entries.v6 = v6_dns.v6;
    let g = guard("dns-v6", &entries, EngineConfig::default());
    let mapped = format!("[::ffff:{ip}]:53");
    let out = g.probe(&[
        format!("dns-sendto {mapped} ok.pg.test"),
        format!("dns-sendto {mapped} m.leak.exfil.test"),
        "dns-udp [::1]:53 ok6.pg.test".to_string(),
        "dns-sendmsg [::1]:53 s.leak6.exfil.test".to_string(),
        format!("dns-connect [::1]:53 ok6.pg.test {port} via-v6"),
        // Last: dnsmasq in the foreground serves TCP in its one process, and waits for the
        // query that never came.
        "dns-tcp [::1]:53 t.leak6.exfil.test".to_string(),
    ]);
    assert_ok(&out[0]);
    assert_failed(&out[1]);
    assert_ok(&out[2]);
    assert_failed(&out[3]);
    assert_ok(&out[4]);
    assert_failed(&out[5]);
    println!("IPv4-mapped refusal: {:?}; IPv6 refusal: {:?}", out[1], out[3]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!v4.saw("m.leak.exfil.test"), "{}", v4.log());
    assert!(
        !v6.saw("s.leak6.exfil.test") && !v6.saw("t.leak6.exfil.test"),
        "{}",
        v6.log()
    );
    assert!(v4.saw("ok.pg.test") && v6.saw("ok6.pg.test"));
}

#[test]
fn a_jobs_own_resolver_teaches_nothing() {
    let web = listeners::tcp("127.0.0.1:0");
    let port = web.addr.port();
    let own = format!("{}:53", own_ip(56));
    // The IP policy even lets the job reach its own resolver: its answers still never leave.
    let g = guard(
        "dns-forge",
        &dns_only("127.0.0.0/8", vec![rule("ok.pg.test", port)]),
        EngineConfig::default(),
    );
    let out = g.probe(&[format!("dns-forge {own} ok.pg.test 127.0.0.1 {port}")]);
    assert_failed(&out[0]);
    assert!(!web.received.wait_for(b"forged", Duration::from_millis(300)));
}

#[test]
fn a_thousand_resolve_then_connect_cycles_without_a_refusal() {
    let web = listeners::tcp("0.0.0.0:0");
    let port = web.addr.port();
    let ip = own_ip(57);
    let hosts: String = (0..1000)
        .map(|i| format!("127.60.{}.{} r{i}.race.test\n", i / 250, i % 250 + 1))
        .collect();
    let dns = Dnsmasq::start("race", &ip, &hosts, 60);
    let g = guard(
        "dns-race",
        &dns_only(&format!("{ip}/32"), vec![rule("*.race.test", port)]),
        EngineConfig::default(),
    );
    let output = common::probe_command(
        g.cgroup.path(),
        &[format!("dns-race {ip}:53 r{{}}.race.test {port} 1000")],
    )
    .output()
    .unwrap();
    let out = common::parse_outcomes(&output);
    std::thread::sleep(Duration::from_secs(2));
    let queries = dns.log().lines().filter(|l| l.contains("query[")).count();
    println!("resolver saw {queries} queries");
    let tail: String = dns.log().lines().rev().take(6).collect::<Vec<_>>().join("\n");
    let counters: Vec<_> = g.engine.counters(g.cgroup_id).unwrap();
    assert!(
        out[0].ok,
        "{:?}\n{}\nresolver log (last lines):\n{tail}\ncounters: {counters:?}",
        out[0],
        String::from_utf8_lossy(&output.stdout)
    );
    let learned = g.engine.learned().unwrap();
    assert!(
        learned.len() >= 1000,
        "every answer was learned: {}",
        learned.len()
    );
}

#[test]
fn learned_entries_expire_but_connections_opened_before_keep_working() {
    let web = listeners::tcp("127.0.0.1:0");
    let port = web.addr.port();
    let ip = own_ip(58);
    let _dns = Dnsmasq::start("ttl", &ip, "127.0.0.1 short.pg.test\n", 1);
    let g = guard(
        "dns-ttl",
        &dns_only(&format!("{ip}/32"), vec![rule("short.pg.test", port)]),
        EngineConfig {
            dns_min_ttl: Duration::from_secs(1),
            ..EngineConfig::default()
        },
    );
    let out = g.probe(&[format!("dns-expiry {ip}:53 short.pg.test {port} 2500")]);
    assert_ok(&out[0]);
    assert!(web.received.wait_for(b"still-open", Duration::from_secs(3)));
    assert!(!web.received.wait_for(b"late-connect", Duration::from_millis(200)));
}

/// A connection to a learned address remembers its allow (the socket's pass makes it as
/// lasting as a static one, so its packets take the fast path); dropping the name from the
/// policy must still cut it at its next packet.
#[test]
fn dropping_a_name_cuts_an_established_connection_to_its_address() {
    let web = listeners::tcp("127.0.0.1:0");
    let port = web.addr.port();
    let ip = own_ip(83);
    let dns = Dnsmasq::start("cut", &ip, "127.0.0.1 held.pg.test\n", 60);
    let mut g = guard(
        "dns-cut",
        &dns_only(&format!("{ip}/32"), vec![rule("held.pg.test", port)]),
        EngineConfig::default(),
    );
    let flag = std::env::temp_dir().join(format!("pg-dns-cut-{}", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    let child = common::probe_command(
        g.cgroup.path(),
        &[format!(
            "dns-hold {} held.pg.test {port} {}",
            dns.addr,
            flag.display()
        )],
    )
    .spawn()
    .expect("spawn probe");
    assert!(
        web.received.wait_for(b"before", Duration::from_secs(5)),
        "allowed while the name is"
    );
    g.engine
        .replace_policy(
            POLICY,
            &dns_only(&format!("{ip}/32"), vec![rule("held.pg.test", port)]),
            &dns_only(&format!("{ip}/32"), vec![rule("other.pg.test", port)]),
        )
        .unwrap();
    std::fs::write(&flag, "go").unwrap();
    let output = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&flag);
    assert!(output.status.success(), "{output:?}");
    assert!(
        !web.received.wait_for(b"after", Duration::from_millis(500)),
        "the connection outlived the name's removal"
    );
    assert!(
        g.engine
            .counters(g.cgroup_id)
            .unwrap()
            .iter()
            .any(|(k, c)| k.hook == Hook::Egress as u8 && k.verdict == VERDICT_DENY && c.packets > 0),
        "the packet hook dropped the connection's next packet"
    );
}

#[test]
fn resolving_a_name_again_renews_its_address() {
    let ip = own_ip(84);
    let dns = Dnsmasq::start("renew", &ip, "127.0.0.1 again.pg.test\n", 5);
    let g = guard(
        "dns-renew",
        &dns_only(&format!("{ip}/32"), vec![rule("again.pg.test", 80)]),
        EngineConfig {
            dns_min_ttl: Duration::from_secs(1),
            ..EngineConfig::default()
        },
    );
    let remaining = || {
        let learned = g.engine.learned().unwrap();
        assert_eq!(learned.len(), 1, "{learned:?}");
        learned[0].remaining
    };
    assert_ok(&g.probe(&[format!("dns-udp {} again.pg.test", dns.addr)])[0]);
    std::thread::sleep(Duration::from_millis(1_500));
    let before = remaining();
    assert_ok(&g.probe(&[format!("dns-udp {} again.pg.test", dns.addr)])[0]);
    let after = remaining();
    assert!(
        after > before,
        "the second answer renewed the entry: {before:?} then {after:?}"
    );
}

#[test]
fn names_sharing_an_address_each_keep_their_own_ports() {
    let (to_a, to_b, other) = (
        listeners::tcp("127.0.0.1:0"),
        listeners::tcp("127.0.0.1:0"),
        listeners::tcp("127.0.0.1:0"),
    );
    let (a, b, c) = (to_a.addr.port(), to_b.addr.port(), other.addr.port());
    let ip = own_ip(87);
    let dns = Dnsmasq::start(
        "shared",
        &ip,
        "127.0.0.1 a.shared.test\n127.0.0.1 b.shared.test\n",
        60,
    );
    let g = guard(
        "dns-shared",
        &dns_only(
            &format!("{ip}/32"),
            vec![rule("a.shared.test", a), rule("b.shared.test", b)],
        ),
        EngineConfig::default(),
    );
    let r = dns.addr;
    let out = g.probe(&[
        format!("dns-udp {r} a.shared.test"),
        // The same address, taught again under another rule (a CDN serving both names).
        format!("dns-udp {r} b.shared.test"),
        format!("tcp 127.0.0.1:{a} to-a"),
        format!("tcp 127.0.0.1:{b} to-b"),
        format!("tcp 127.0.0.1:{c} to-neither"),
    ]);
    for o in &out[..4] {
        assert_ok(o);
    }
    assert!(
        out[4].denied_with_eperm(),
        "no rule allows that port: {:?}",
        out[4]
    );
    assert!(to_a.received.wait_for(b"to-a", Duration::from_secs(3)));
    assert!(to_b.received.wait_for(b"to-b", Duration::from_secs(3)));
    let learned = g.engine.learned().unwrap();
    let holds = learned
        .iter()
        .filter(|l| l.addr == std::net::IpAddr::from([127, 0, 0, 1]))
        .count();
    assert_eq!(holds, 2, "one hold per rule on the shared address: {learned:?}");
}

#[test]
fn getaddrinfo_of_a_refused_name_fails_fast() {
    let ip = own_ip(59);
    let dns = Dnsmasq::start("gai", &ip, "127.0.0.1 ok.pg.test\n", 60);
    let g = guard(
        "dns-gai",
        &dns_only(&format!("{ip}/32"), vec![rule("ok.pg.test", 80)]),
        EngineConfig::default(),
    );
    let conf = dns.resolv_conf();
    let out = g.probe(&[
        format!("dns-getaddrinfo {} ok.pg.test", conf.display()),
        format!("dns-getaddrinfo {} gai.exfil.test", conf.display()),
    ]);
    assert_ok(&out[0]);
    assert_failed(&out[1]);
    // Measured, not asserted (no timing asserts): BENCHMARKS.md and the report quote it.
    println!(
        "getaddrinfo: allowed {} ms, refused {} ms",
        out[0].elapsed_ms, out[1].elapsed_ms
    );
    assert!(!dns.saw("gai.exfil.test"), "{}", dns.log());
}

#[test]
fn pinned_dns_state_keeps_filtering_and_resolving_without_the_engine() {
    let web = listeners::tcp("127.0.0.1:0");
    let port = web.addr.port();
    let ip = own_ip(61);
    let dns = Dnsmasq::start(
        "pins",
        &ip,
        "127.0.0.1 ok.pg.test\n127.0.0.1 gone.exfil.test\n",
        60,
    );
    let bpffs = common::Bpffs::mount("dns-pins");
    let config = EngineConfig {
        pin_dir: Some(bpffs.pin_dir()),
        ..EngineConfig::default()
    };
    let g = guard(
        "dns-pins",
        &dns_only(&format!("{ip}/32"), vec![rule("ok.pg.test", port)]),
        config,
    );
    // The engine's process state goes away as on SIGKILL: every fd closed, nothing cleaned.
    let Guarded { engine, cgroup, .. } = g;
    drop(engine);
    let out = run_probe(
        cgroup.path(),
        &[
            format!("dns-connect {ip}:53 ok.pg.test {port} no-engine"),
            format!("dns-udp {ip}:53 x.gone.exfil.test"),
        ],
    );
    assert_ok(&out[0]);
    assert!(out[1].denied_with_eperm(), "{:?}", out[1]);
    assert!(web.received.wait_for(b"no-engine", Duration::from_secs(3)));
    assert!(!dns.saw("x.gone.exfil.test"), "{}", dns.log());
    drop(cgroup);
    drop(bpffs);
}

/// Address `n` of a loopback block of this test process's own.
fn own_addr(block: u8, n: u8) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, block, (std::process::id() % 250) as u8, n)
}

/// A job's forgeries of an answer it saw, beyond its own resolver (above). The IP policy lets
/// the job send UDP anywhere on loopback, so only the DNS check stands in the way. Sent from
/// port 53 (of another loopback address, or of the resolver's own address and port), a
/// forgery never leaves the job: a DNS-filtered pod sends no answers. From any other port it
/// arrives but is no answer to the kernel. Raw sockets to forge a source are refused at
/// creation: kernel_engine.rs, `raw_and_packet_sockets_are_refused_at_creation`.
#[test]
fn answers_forged_or_replayed_by_the_job_teach_nothing() {
    let web = listeners::tcp("127.0.0.1:0");
    let port = web.addr.port();
    let forged = own_addr(63, 1);
    let ip = own_ip(62);
    let dns = Dnsmasq::start("replay", &ip, "127.0.0.1 ok.pg.test\n", 60);
    let mut entries = common::allow_only("127.0.0.0/8", 53, &[PROTO_TCP]);
    let udp_anywhere = pipeguard_common::PortRange {
        start: 1,
        end: u16::MAX,
        protocol: PROTO_UDP,
        _pad: [0; 3],
    };
    entries.v4[0].1.ranges[1] = udp_anywhere;
    entries.v4[0].1.count = 2;
    entries.names = vec![rule("ok.pg.test", port)];
    let g = guard("dns-replay", &entries, EngineConfig::default());
    let r = dns.addr;
    let out = g.probe(&[
        format!("dns-replay {r} ok.pg.test {forged} {}:53", own_ip(64)),
        format!("dns-replay {r} ok.pg.test {forged} {r}"),
        format!("dns-replay {r} ok.pg.test {forged} 0.0.0.0:0"),
        format!("tcp 127.0.0.1:{port} genuine"),
        format!("tcp {forged}:{port} forged"),
    ]);
    assert!(
        out[0].denied_with_eperm(),
        "port 53 of another address: {:?}",
        out[0]
    );
    assert!(
        out[1].denied_with_eperm(),
        "the resolver's address and port: {:?}",
        out[1]
    );
    assert_ok(&out[2]);
    assert_ok(&out[3]);
    assert!(
        out[4].denied_with_eperm(),
        "a forged address was learned: {:?}",
        out[4]
    );
    assert!(web.received.wait_for(b"genuine", Duration::from_secs(3)));
}

/// Answers from outside the job, where the kernel's answer check alone decides (an off-path
/// spoofer on the network, or a resolver misbehaving): only the first answer from the
/// queried address and port, with the query's id and question, to the asking socket,
/// teaches. Each refused answer is followed by the genuine one, which must still teach: the
/// refusal is the check's doing, not a lost query.
#[test]
fn only_the_answer_to_the_outstanding_query_teaches() {
    use common::spoof::{Id, Reply, ScriptedResolver};
    let web = listeners::tcp("127.0.0.1:0");
    let port = web.addr.port();
    let taught = |n| own_addr(67, n);
    let forged = |n| own_addr(68, n);
    let _listeners: Vec<_> = (1..=5)
        .map(|n| listeners::tcp(&format!("{}:{port}", taught(n))))
        .collect();
    let reply = |from, id, name: &str, addr| Reply {
        from,
        id,
        name: name.into(),
        addr,
    };
    let resolver = ScriptedResolver::start(&own_ip(65), &[&own_ip(66)], move |name| match name {
        "genuine.spoof.test" => vec![reply(0, Id::Same, name, taught(1))],
        "replay.spoof.test" => vec![
            reply(0, Id::Same, name, taught(2)),
            reply(0, Id::Same, name, forged(2)),
        ],
        "question.spoof.test" => vec![
            reply(0, Id::Same, "other.spoof.test", forged(3)),
            reply(0, Id::Same, name, taught(3)),
        ],
        "id.spoof.test" => vec![
            reply(0, Id::Other, name, forged(4)),
            reply(0, Id::Same, name, taught(4)),
        ],
        "address.spoof.test" => vec![
            reply(1, Id::Same, name, forged(5)),
            reply(0, Id::Same, name, taught(5)),
        ],
        _ => Vec::new(),
    });
    let g = guard(
        "dns-spoof",
        &dns_only(&format!("{}/32", own_ip(65)), vec![rule("*.spoof.test", port)]),
        EngineConfig::default(),
    );
    let r = resolver.addr;
    let mut actions = vec![format!("dns-ask {r} genuine.spoof.test 1")];
    for name in ["replay", "question", "id", "address"] {
        actions.push(format!("dns-ask {r} {name}.spoof.test 2"));
    }
    for n in 1..=5 {
        actions.push(format!("tcp {}:{port} taught-{n}", taught(n)));
    }
    for n in 2..=5 {
        actions.push(format!("tcp {}:{port} forged-{n}", forged(n)));
    }
    let out = g.probe(&actions);
    for o in &out[..10] {
        assert_ok(o);
    }
    for o in &out[10..] {
        assert!(o.denied_with_eperm(), "a forged answer taught its address: {o:?}");
    }
}

#[test]
fn the_min_ttl_floor_keeps_a_short_lived_answer_usable() {
    let web = listeners::tcp("127.0.0.1:0");
    let port = web.addr.port();
    let ip = own_ip(69);
    // The answer lives 1 s, the floor 4 s: a new connection at 1.8 s works only by the floor.
    let _dns = Dnsmasq::start("floor", &ip, "127.0.0.1 floor.pg.test\n", 1);
    let g = guard(
        "dns-floor",
        &dns_only(&format!("{ip}/32"), vec![rule("floor.pg.test", port)]),
        EngineConfig {
            dns_min_ttl: Duration::from_secs(4),
            ..EngineConfig::default()
        },
    );
    let out = g.probe(&[format!("dns-floor {ip}:53 floor.pg.test {port} 1800 5500")]);
    assert_ok(&out[0]);
    assert!(web.received.wait_for(b"within-floor", Duration::from_secs(3)));
    assert!(!web.received.wait_for(b"past-floor", Duration::from_millis(200)));
}

/// The routes `ipv4_mapped_and_ipv6_resolvers_are_filtered_too` leaves out: refused names by
/// every UDP route and by TCP over v4-mapped sockets, allowed ones by sendmmsg and TCP.
#[test]
fn refused_names_never_leave_ipv6_or_mapped_sockets_by_any_route() {
    let ip = own_ip(70);
    let v4 = Dnsmasq::start(
        "mapped-routes",
        &ip,
        "127.0.0.1 ok.pg.test\n127.0.0.1 leak.exfil.test\n",
        60,
    );
    let v6 = Dnsmasq::start(
        "v6-routes",
        "::1",
        "127.0.0.1 ok6.pg.test\n127.0.0.1 leak6.exfil.test\n",
        60,
    );
    let mut entries = dns_only(
        &format!("{ip}/32"),
        vec![rule("ok.pg.test", 80), rule("ok6.pg.test", 80)],
    );
    entries.v6 = common::allow_only("::1/128", 53, &[PROTO_UDP, PROTO_TCP]).v6;
    let g = guard("dns-v6-routes", &entries, EngineConfig::default());
    let mapped = format!("[::ffff:{ip}]:53");
    let mut actions = Vec::new();
    for (resolver, name) in [(mapped.as_str(), "ok.pg.test"), ("[::1]:53", "ok6.pg.test")] {
        for route in ["dns-sendmmsg", "dns-tcp"] {
            actions.push(format!("{route} {resolver} {name}"));
        }
    }
    let allowed = actions.len();
    for route in ["udp", "sendto", "sendmsg", "sendmmsg"] {
        actions.push(format!("dns-{route} {mapped} {route}.leak.exfil.test"));
        actions.push(format!("dns-{route} [::1]:53 {route}.leak6.exfil.test"));
    }
    // Last: dnsmasq serves TCP in its one process and waits for the query that never came.
    actions.push(format!("dns-tcp {mapped} tcp.leak.exfil.test"));
    let out = g.probe(&actions);
    for o in &out[..allowed] {
        assert_ok(o);
    }
    for o in &out[allowed..] {
        assert_failed(o);
    }
    std::thread::sleep(Duration::from_millis(300));
    for route in ["udp", "sendto", "sendmsg", "sendmmsg", "tcp"] {
        assert!(
            !v4.saw(&format!("{route}.leak.exfil.test")),
            "{route}:\n{}",
            v4.log()
        );
        assert!(
            !v6.saw(&format!("{route}.leak6.exfil.test")),
            "{route}:\n{}",
            v6.log()
        );
    }
    assert!(v4.saw("ok.pg.test") && v6.saw("ok6.pg.test"));
}

/// UDP GSO (`UDP_SEGMENT`): one send the kernel splits into datagrams after the egress hook.
/// A query must be one datagram: a GSO send to port 53 is refused whole, so a refused name
/// cannot ride behind an allowed one. Control: the same send to a plain UDP port the policy
/// allows arrives as two datagrams (GSO works here; the refusal is the DNS check's).
#[test]
fn a_refused_query_cannot_ride_behind_an_allowed_one_in_a_udp_gso_send() {
    let ip = own_ip(75);
    let dns = Dnsmasq::start("gso", &ip, "127.0.0.1 ok.pg.test\n127.0.0.1 gso.exfil.test\n", 60);
    let plain = listeners::udp("127.0.0.1:0");
    let mut entries = dns_only(&format!("{ip}/32"), vec![rule("ok.pg.test", 80)]);
    let udp = common::allow_only("127.0.0.1/32", plain.addr.port(), &[PROTO_UDP]);
    entries.v4.extend(udp.v4);
    let g = guard("dns-gso", &entries, EngineConfig::default());
    let out = g.probe(&[
        format!("dns-gso {} ok.pg.test gso.exfil.test", plain.addr),
        format!("dns-gso {ip}:53 ok.pg.test gso.exfil.test"),
    ]);
    assert_ok(&out[0]);
    assert!(
        plain
            .received
            .wait_for(b"\x03gso\x05exfil", Duration::from_secs(3)),
        "the control's second datagram never arrived"
    );
    assert!(out[1].denied_with_eperm(), "{:?}", out[1]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !dns.saw("gso.exfil.test") && !dns.saw("ok.pg.test"),
        "smuggled past the DNS filter:\n{}",
        dns.log()
    );
}

/// Every event the ring buffer holds, with names from the engine's name table.
fn drain_named(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    names: &mut pipeguard::engine::dns::NameTexts,
) -> Vec<pipeguard::engine::events::Violation> {
    let clock = pipeguard::engine::events::Clock::now();
    let mut seen = Vec::new();
    while let Some(item) = ring.next() {
        seen.extend(pipeguard::engine::events::decode_named(&item, &clock, names));
    }
    seen
}

#[test]
fn refused_queries_are_events_with_their_question_and_learned_addresses_carry_their_name() {
    let web = listeners::tcp("127.0.0.1:0");
    let other = listeners::tcp("127.0.0.1:0");
    let (port, other_port) = (web.addr.port(), other.addr.port());
    let ip = own_ip(80);
    let dns = Dnsmasq::start(
        "events",
        &ip,
        "127.0.0.1 ok.pg.test\n127.0.0.1 secret.exfil.test\n",
        60,
    );
    let mut g = guard(
        "dns-events",
        &dns_only(&format!("{ip}/32"), vec![rule("ok.pg.test", port)]),
        EngineConfig::default(),
    );
    let mut ring = g.engine.take_events().unwrap();
    let mut names = g.engine.name_texts().unwrap();
    let r = dns.addr;
    let out = g.probe(&[
        format!("dns-udp {r} secret.exfil.test"),
        // Learned from ok.pg.test, but on a port its rule does not allow.
        format!("dns-connect {r} ok.pg.test {other_port} wrong-port"),
    ]);
    assert!(out[0].denied_with_eperm(), "{:?}", out[0]);
    assert!(out[1].denied_with_eperm(), "{:?}", out[1]);
    let seen = drain_named(&mut ring, &mut names);
    let query = seen
        .iter()
        .find(|v| v.hook == "dns")
        .unwrap_or_else(|| panic!("no dns event in {seen:#?}"));
    assert_eq!(query.verdict, "deny");
    assert_eq!(query.query.as_deref(), Some("secret.exfil.test"), "{query:?}");
    assert_eq!(query.qtype.as_deref(), Some("A"));
    assert_eq!(query.dst_ip, Some(ip.parse().unwrap()), "the resolver");
    assert_eq!(query.dst_port, Some(53));
    assert!(!query.malformed);
    let named = seen
        .iter()
        .find(|v| v.hook == "connect4" && v.dst_port == Some(other_port))
        .unwrap_or_else(|| panic!("no connect4 event in {seen:#?}"));
    assert_eq!(named.dst_name.as_deref(), Some("ok.pg.test"), "{named:?}");
    let json = serde_json::to_value(named).unwrap();
    assert_eq!(json["dst_name"], "ok.pg.test");
    assert!(!dns.saw("secret.exfil.test"), "{}", dns.log());
}

#[test]
fn the_sweep_removes_expired_entries_and_connections_opened_before_outlive_them() {
    let web = listeners::tcp("127.0.0.1:0");
    let port = web.addr.port();
    let ip = own_ip(81);
    let dns = Dnsmasq::start(
        "sweep",
        &ip,
        "127.0.0.2 gone.pg.test\n127.0.0.1 held.pg.test\n",
        1,
    );
    let mut g = guard(
        "dns-sweep",
        &dns_only(&format!("{ip}/32"), vec![rule("*.pg.test", port)]),
        EngineConfig {
            dns_min_ttl: Duration::from_secs(1),
            ..EngineConfig::default()
        },
    );
    let r = dns.addr;
    let out = g.probe(&[format!("dns-udp {r} gone.pg.test")]);
    assert_ok(&out[0]);
    let fresh = g.engine.sweep_dns().unwrap();
    assert_eq!(
        (fresh.learned_removed, fresh.learned_remaining),
        (0, 1),
        "nothing expired yet"
    );
    // In the background: resolve held.pg.test, connect, wait 4 s (its entry expires after
    // 1 s and is swept meanwhile), send on the open connection, then try a new one.
    let cgroup = g.cgroup.path().to_path_buf();
    let held =
        std::thread::spawn(move || run_probe(&cgroup, &[format!("dns-expiry {r} held.pg.test {port} 4000")]));
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let held_ip: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    loop {
        let learned = g.engine.learned().unwrap();
        if learned
            .iter()
            .any(|l| l.addr == held_ip && l.remaining == Duration::ZERO)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "held.pg.test was never learned and expired: {learned:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sweep = g.engine.sweep_dns().unwrap();
    assert_eq!(
        (sweep.learned_removed, sweep.learned_remaining),
        (2, 0),
        "both expired entries are removed: {sweep:?}"
    );
    assert!(g.engine.learned().unwrap().is_empty());
    let out = held.join().unwrap();
    // The connection opened while its entry lived still works; a new one is refused.
    assert_ok(&out[0]);
    assert!(web.received.wait_for(b"still-open", Duration::from_secs(3)));
    assert!(!web.received.wait_for(b"late-connect", Duration::from_millis(200)));
    let late = g.probe(&[format!("tcp 127.0.0.2:{port} late")]);
    assert!(late[0].denied_with_eperm(), "{:?}", late[0]);
}

/// The queries reported for dns_tunnel: those a wildcard rule allows, each name once per
/// pod per minute, and only when asked (`report_queries`); never those an exact rule
/// allows. A guarded pod without domain rules has every query's name reported (read, never
/// judged: its IP rules decide).
#[test]
fn queries_whose_names_the_job_chooses_are_reported_once_per_name_when_asked() {
    let ip = own_ip(85);
    let hosts =
        "127.0.0.1 a.wild.test\n127.0.0.1 b.wild.test\n127.0.0.1 c.wild.test\n127.0.0.1 exact.pg.test\n";
    let dns = Dnsmasq::start("reports", &ip, hosts, 60);
    let r = dns.addr;
    let names = vec![rule("*.wild.test", 443), rule("exact.pg.test", 443)];
    let actions = [
        format!("dns-udp {r} a.wild.test"),
        format!("dns-udp {r} a.wild.test"),
        format!("dns-udp {r} B.wild.test"),
        format!("dns-udp {r} a.wild.test"),
        format!("dns-tcp {r} c.wild.test"),
        format!("dns-udp {r} exact.pg.test"),
    ];
    let reported = |entries: PolicyEntries, config: EngineConfig, flags: u32| -> Vec<String> {
        let mut g = guard_pod("dns-reports", &entries, config, flags);
        let mut ring = g.engine.take_events().unwrap();
        let mut texts = g.engine.name_texts().unwrap();
        for o in g.probe(&actions) {
            assert_ok(&o);
        }
        drain_named(&mut ring, &mut texts)
            .into_iter()
            .map(|v| {
                assert_eq!((v.hook, v.verdict), ("dns", "allow"), "{v:?}");
                v.query.unwrap()
            })
            .collect()
    };
    let asked = || EngineConfig {
        report_queries: true,
        ..EngineConfig::default()
    };
    let filtered = POD_DENY_RAW_SOCKETS | POD_DNS_FILTERED;
    let with_names = || dns_only(&format!("{ip}/32"), names.clone());
    assert_eq!(
        reported(with_names(), asked(), filtered),
        ["a.wild.test", "B.wild.test", "c.wild.test"]
    );
    assert!(reported(with_names(), EngineConfig::default(), filtered).is_empty());
    let ip_rules_only = dns_only(&format!("{ip}/32"), Vec::new());
    assert_eq!(
        reported(ip_rules_only.clone(), asked(), POD_DENY_RAW_SOCKETS),
        ["a.wild.test", "B.wild.test", "c.wild.test", "exact.pg.test"]
    );
    assert!(reported(ip_rules_only, EngineConfig::default(), POD_DENY_RAW_SOCKETS).is_empty());
}

/// While names are learned (`exec --learn`), the answers to a pod without domain rules
/// name the addresses they carry, and allow nothing: the same allowlist, once its pod is
/// DNS-filtered, still refuses the address until a rule allows the name.
#[test]
fn names_learned_for_a_pod_without_domain_rules_allow_nothing() {
    let web = listeners::tcp("127.0.0.1:0");
    let port = web.addr.port();
    let ip = own_ip(86);
    let dns = Dnsmasq::start("seen", &ip, "127.0.0.1 seen.pg.test\n", 60);
    let r = dns.addr;
    let config = EngineConfig {
        learn_names: true,
        ..EngineConfig::default()
    };
    let mut g = guard_pod(
        "dns-seen",
        &dns_only(&format!("{ip}/32"), Vec::new()),
        config,
        POD_DENY_RAW_SOCKETS,
    );
    assert_ok(&g.probe(&[format!("dns-udp {r} seen.pg.test")])[0]);
    let names = g.engine.learned_names(POLICY).unwrap();
    assert_eq!(
        names.get(&"127.0.0.1".parse().unwrap()).map(String::as_str),
        Some("seen.pg.test"),
        "{names:?}"
    );
    assert_eq!(g.engine.seen().unwrap().len(), 1);
    assert!(
        g.engine.learned().unwrap().is_empty(),
        "names for learning stay out of the allowlists' table"
    );

    // DNS-filtered, with a rule for another name only: the seen entry is no allow.
    g.engine
        .put_policy(
            POLICY,
            &dns_only(&format!("{ip}/32"), vec![rule("other.pg.test", port)]),
        )
        .unwrap();
    g.engine
        .put_pod(
            g.cgroup_id,
            PodEntry {
                policy_id: POLICY,
                mode: MODE_ENFORCE,
                flags: POD_DENY_RAW_SOCKETS | POD_DNS_FILTERED,
                ..PodEntry::default()
            },
        )
        .unwrap();
    let out = g.probe(&[format!("tcp 127.0.0.1:{port} seen")]);
    assert!(out[0].denied_with_eperm(), "{:?}", out[0]);
    assert!(web.received.bytes().is_empty());
}
