//! Sections D1–D4: DNS-aware egress. A real resolver (dnsmasq) and the loopback server in a
//! network namespace of this run's own; an unguarded job, a job with IP rules only and jobs
//! with 16 and 10,000 domain rules resolve (and connect to the answer) in interleaved
//! rounds. The kernel cost of checking a query and of learning an answer comes from the
//! kernel's run-time statistics of `pg_egress`/`pg_ingress` on that real traffic, and for
//! the query check also from BPF_PROG_TEST_RUN run inside the job's cgroup.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    Bench, PIN_ENV, Params, cpus,
    dns_worker::{NON_DNS_PORT, QUERIED_NAMES, name},
    kernel::{self, EmptyJob, join_on_exec},
    net::{PORT_CRR, Sample},
    netns::OwnNetns,
    report::{Json, summarize},
};

/// The resolver's own loopback address, inside the bench's namespace.
const RESOLVER: &str = "127.0.53.1";
/// Guarded configurations: key, worker key, domain rules (0: IP rules allow the server).
/// `dns-ip` runs with dns_tunnel off (no DNS program at all), `dns-ip-seen` as exec runs by
/// default: the same IP rules, every query's name read and reported for dns_tunnel.
const GUARDED: [(&str, &str, usize); 4] = [
    ("dns-ip", "dns-ip", 0),
    ("dns-ip-seen", "dns-ip-seen", 0),
    ("dns-names", "dns-names", QUERIED_NAMES),
    ("dns-10k", "dns-10k", 10_000),
];

/// `pipeguard exec` options of a guarded configuration.
fn exec_args(cfg: &str) -> &'static [&'static str] {
    if cfg == "dns-ip" {
        &["--anomaly", "dns_tunnel=off"]
    } else {
        &[]
    }
}
const BASE_WORKER: &str = "dns-base";
/// An unguarded job in a cgroup with empty programs (see `kernel::EmptyJob`).
const EMPTY: &str = "dns-empty";
const SERVER_WORKER: &str = "srv-dns";

impl Bench {
    pub(super) fn dns(&mut self, p: &Params) -> Result<()> {
        let ns = format!("pgb-dns-{}", std::process::id());
        let netns = OwnNetns::create(&ns)?;
        for (cfg, _, names) in GUARDED {
            fs::write(self.policy_path(cfg), dns_policy(names))?;
        }
        let resolver = Dnsmasq::start(&ns, &self.dir)?;
        let empty = EmptyJob::create(&format!("pgbench-dns-{}", std::process::id()))?;
        let outcome = self.dns_sections(p, &ns, &empty);
        for (_, key, _) in GUARDED {
            drop(self.workers.remove(key));
        }
        drop(self.workers.remove(BASE_WORKER));
        drop(self.workers.remove(EMPTY));
        drop(empty);
        drop(self.workers.remove(SERVER_WORKER));
        drop(resolver);
        drop(netns);
        outcome
    }

    fn dns_sections(&mut self, p: &Params, ns: &str, empty: &EmptyJob) -> Result<()> {
        let reps = p.control_reps.max(2);
        let exec = self.dns_exec_cost(reps)?;

        let mut srv = Self::in_netns(ns, &self.worker_bin);
        srv.args(["bench-worker", "server", "127.0.0.1"]);
        if cpus() >= 2 {
            srv.env(PIN_ENV, (cpus() - 1).to_string());
        }
        self.spawn(SERVER_WORKER, srv)?;
        self.spawn(BASE_WORKER, self.client(ns, None, None))?;
        let mut cmd = self.client(ns, None, None);
        join_on_exec(&mut cmd, &empty.cgroup.path)?;
        self.spawn(EMPTY, cmd)?;
        self.wait_for_resolver()?;
        for (cfg, key, _) in GUARDED {
            let policy = self.policy_path(cfg);
            self.spawn(key, self.client_with(ns, &policy, exec_args(cfg)))?;
        }

        let rounds = p.rounds.max(5);
        let secs = p.secs.max(0.5);
        self.table.section(
            "D1. DNS: lookups per second, interleaved rounds; each resolves a name over UDP (a fresh socket per lookup, like glibc), then connects to the answer and exchanges 1 byte, or not (resolve only)",
            &["path", "configuration", "cycles/s, median (min–max)", "ratio to no enforcement"],
        );
        let configs = ["base", EMPTY, "dns-ip", "dns-ip-seen", "dns-names", "dns-10k"];
        let no_stats = |_: &mut Self, _: &str| Ok(BTreeMap::new());
        let (crr, _) = self.dns_rounds("dns-crr", &configs, rounds, secs, no_stats)?;
        self.record(
            "dns_resolve_connect",
            "resolve+connect",
            "/s",
            &crr,
            &configs,
            1.0,
            &[
                ("dns-names", EMPTY),
                ("dns-ip-seen", "dns-ip"),
                ("dns-names", "dns-ip"),
                ("dns-10k", "dns-ip"),
            ],
        );
        let stats = kernel::BpfStats::enable()?;
        let (resolve, hooks) = self.dns_rounds("dns-resolve", &configs, rounds, secs, hook_stats)?;
        drop(stats);
        self.record(
            "dns_resolve",
            "resolve only",
            "/s",
            &resolve,
            &configs,
            1.0,
            &[
                ("dns-ip-seen", "dns-ip"),
                ("dns-names", "dns-ip"),
                ("dns-10k", "dns-ip"),
            ],
        );
        self.dns_hook_table(&hooks);
        self.dns_test_run(p)?;
        self.dns_exec_table(&exec);
        Ok(())
    }

    /// The resolver answers from the base worker's namespace (dnsmasq takes a moment).
    fn wait_for_resolver(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self
                .worker(BASE_WORKER)?
                .ask(&format!("dns-resolve {RESOLVER}:53 0.01"))
            {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("dnsmasq on {RESOLVER} never answered")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Interleaved rounds of `verb`, with `stats` read around each guarded round: per
    /// configuration the rates, and per (configuration, program) the ns/run of each round
    /// with the run count summed.
    #[allow(clippy::type_complexity)]
    fn dns_rounds(
        &mut self,
        verb: &str,
        configs: &[&str],
        rounds: usize,
        secs: f64,
        stats: fn(&mut Self, &str) -> Result<BTreeMap<String, kernel::RunStats>>,
    ) -> Result<(
        BTreeMap<String, Vec<f64>>,
        BTreeMap<(String, String), (Vec<f64>, u64)>,
    )> {
        let mut rates: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut hooks: BTreeMap<(String, String), (Vec<f64>, u64)> = BTreeMap::new();
        for r in 0..=rounds {
            for i in 0..configs.len() {
                let cfg = configs[(i + r) % configs.len()];
                let key = worker_key(cfg);
                if r == 0 {
                    // Warm-up, not counted.
                    self.worker(key)?
                        .ask(&format!("{verb} {RESOLVER}:53 {}", secs / 2.0))?;
                    continue;
                }
                // Unguarded workers hold no programs to read.
                let guarded = cfg != "base" && cfg != EMPTY;
                let before = if guarded {
                    stats(self, key)?
                } else {
                    BTreeMap::new()
                };
                let s: Sample = self.worker(key)?.ask(&format!("{verb} {RESOLVER}:53 {secs}"))?;
                rates.entry(cfg.to_string()).or_default().push(s.rate());
                if !guarded {
                    continue;
                }
                for (prog, after) in stats(self, key)? {
                    let d = after.since(before.get(&prog).copied().unwrap_or_default());
                    if d.run_cnt > 0 {
                        let e = hooks.entry((cfg.to_string(), prog)).or_default();
                        e.0.push(d.run_time_ns as f64 / d.run_cnt as f64);
                        e.1 += d.run_cnt;
                    }
                }
            }
        }
        Ok((rates, hooks))
    }

    /// Every program of each job on the resolve-only rounds: ns per run, and how often it
    /// runs per lookup (one query leaves per lookup, so `pg_egress` runs once): the sum is
    /// the kernel cost pipeguard adds to one lookup. Tail-called programs (the DNS ones) are
    /// timed inside their caller.
    fn dns_hook_table(&mut self, hooks: &BTreeMap<(String, String), (Vec<f64>, u64)>) {
        self.table.section(
            "D2. DNS: kernel ns per program run on the resolve-only rounds above (kernel.bpf_stats_enabled; one query leaves, one answer arrives per lookup; DNS programs are timed in the hook that tail-calls them)",
            &["configuration", "program", "runs per lookup", "ns/run, median of rounds (min–max)", "ns per lookup", "minus IP rules only"],
        );
        let per_lookup = |cfg: &str, prog: &str| -> Option<(f64, f64)> {
            let lookups = hooks.get(&(cfg.to_string(), "pg_egress".to_string()))?.1 as f64;
            let (per_round, runs) = hooks.get(&(cfg.to_string(), prog.to_string()))?;
            let per = *runs as f64 / lookups;
            Some((per, summarize(per_round).median * per))
        };
        let programs: std::collections::BTreeSet<&str> = hooks.keys().map(|(_, p)| p.as_str()).collect();
        let mut arr = Json::Arr(Vec::new());
        for (cfg, _, _) in GUARDED {
            let mut total = 0.0;
            let mut ip_total = 0.0;
            for prog in &programs {
                let Some((per_round, runs)) = hooks.get(&(cfg.to_string(), prog.to_string())) else {
                    continue;
                };
                let Some((per, ns)) = per_lookup(cfg, prog) else {
                    continue;
                };
                let ip_only = per_lookup("dns-ip", prog).map(|(_, ns)| ns);
                total += ns;
                ip_total += ip_only.unwrap_or(0.0);
                let extra = ip_only.filter(|_| cfg != "dns-ip").map(|b| ns - b);
                let s = summarize(per_round);
                let mut o = Json::obj();
                o.set("config", cfg)
                    .set("program", *prog)
                    .set("run_cnt", *runs)
                    .set("runs_per_lookup", per)
                    .set("ns_per_run_rounds", s)
                    .set("ns_per_lookup", ns)
                    .set("ns_per_lookup_minus_ip_only", extra);
                arr.push(o);
                self.table.row(vec![
                    super::configs::label(cfg).to_string(),
                    prog.to_string(),
                    format!("{per:.2}"),
                    format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max),
                    format!("{ns:.0}"),
                    extra.map_or("—".to_string(), |e| format!("{e:+.0}")),
                ]);
            }
            let extra = (cfg != "dns-ip").then_some(total - ip_total);
            let mut o = Json::obj();
            o.set("config", cfg)
                .set("program", "all")
                .set("ns_per_lookup", total)
                .set("ns_per_lookup_minus_ip_only", extra);
            arr.push(o);
            self.table.row(vec![
                super::configs::label(cfg).to_string(),
                "**all programs**".to_string(),
                String::new(),
                String::new(),
                format!("**{total:.0}**"),
                extra.map_or("—".to_string(), |e| format!("{e:+.0}")),
            ]);
        }
        self.figures.set("dns_kernel_ns_per_run", arr);
    }

    /// BPF_PROG_TEST_RUN of each guarded job's `pg_egress` from inside its cgroup: a query
    /// for an allowed name versus a non-DNS UDP packet to the same address. A query for a
    /// refused name must come back dropped from the DNS-filtered jobs: the proof that the
    /// program saw the packet as the job's.
    fn dns_test_run(&mut self, p: &Params) -> Result<()> {
        let repeat = if p.quick { 200_000 } else { 1_000_000 };
        let rounds = p.kernel_rounds.max(3);
        let mut ids = BTreeMap::new();
        for (cfg, key, names) in GUARDED {
            let pid = self.worker(key)?.pid();
            let id = kernel::process_prog_id(pid, "pg_egress")?;
            let refused = self.test_run(key, id, "refused", 1)?;
            let want = if names > 0 { 0 } else { 1 };
            if refused.ops != want {
                bail!(
                    "{cfg}: pg_egress returned {} for a refused query, want {want}",
                    refused.ops
                );
            }
            ids.insert(cfg, id);
        }
        let kinds = ["allowed", "other"];
        let mut ns: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
        for r in 0..rounds {
            for (i, _) in GUARDED.iter().enumerate() {
                let (cfg, key, _) = GUARDED[(i + r) % GUARDED.len()];
                for kind in kinds {
                    let s = self.test_run(key, ids[cfg], kind, repeat)?;
                    if s.ops != 1 {
                        bail!("{cfg}: pg_egress dropped the {kind} test packet");
                    }
                    ns.entry((cfg, kind)).or_default().push(s.secs);
                }
            }
        }
        self.table.section(
            &format!(
                "D3. DNS: BPF_PROG_TEST_RUN of pg_egress from inside the job's cgroup, {repeat} runs × {rounds} rounds (no bpf_stats)"
            ),
            &[
                "configuration",
                "query for an allowed name, ns/run",
                "non-DNS UDP packet, ns/run",
                "query minus non-DNS packet",
                "query minus the same query under IP rules only, dns_tunnel off: the **query check** (domain rules), the name read for dns_tunnel (IP rules only)",
            ],
        );
        // The non-DNS packet takes the socket's fast path from its second run on; a query
        // never does (DNS is always judged in full), so "minus non-DNS" also holds the
        // slow path any DNS packet pays. The same query under IP rules only takes that same
        // slow path without the DNS program: the difference is the query check itself.
        let ip_query = summarize(&ns[&("dns-ip", "allowed")]).median;
        let mut arr = Json::Arr(Vec::new());
        for (cfg, _, _) in GUARDED {
            let q = summarize(&ns[&(cfg, "allowed")]);
            let o = summarize(&ns[&(cfg, "other")]);
            let check = (cfg != "dns-ip").then_some(q.median - ip_query);
            let mut j = Json::obj();
            j.set("config", cfg)
                .set("repeat", u64::from(repeat))
                .set("query_ns", q)
                .set("non_dns_ns", o)
                .set("query_minus_non_dns_ns", q.median - o.median)
                .set("query_check_ns", check);
            arr.push(j);
            self.table.row(vec![
                super::configs::label(cfg).to_string(),
                format!("{:.0} ({:.0}–{:.0})", q.median, q.min, q.max),
                format!("{:.0} ({:.0}–{:.0})", o.median, o.min, o.max),
                format!("{:.0}", q.median - o.median),
                check.map_or("—".to_string(), |c| format!("**{c:.0}**")),
            ]);
        }
        self.figures.set("dns_test_run", arr);
        Ok(())
    }

    fn test_run(&mut self, key: &str, prog_id: u32, kind: &str, repeat: u32) -> Result<Sample> {
        self.worker(key)?.ask(&format!(
            "egress-test-run {prog_id} {RESOLVER}:53 {kind} {repeat}"
        ))
    }

    /// `pipeguard exec --policy P -- true` per configuration: the DNS programs load on first
    /// need (IP rules with dns_tunnel on minus off), 10,000 names compile and fill their map
    /// (dns-10k minus dns-names).
    fn dns_exec_cost(&self, reps: usize) -> Result<Vec<(&'static str, Vec<f64>)>> {
        let mut out: Vec<(&'static str, Vec<f64>)> =
            GUARDED.iter().map(|(c, _, _)| (*c, Vec::new())).collect();
        for _ in 0..reps {
            for (cfg, times) in &mut out {
                let t = Instant::now();
                let st = Command::new(&self.pipeguard)
                    .args(["exec", "--namespace", "default", "--policy"])
                    .arg(self.policy_path(cfg))
                    .args(exec_args(cfg))
                    .args(["--", "true"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()?;
                if !st.success() {
                    bail!("pipeguard exec --policy {cfg}.yaml -- true: {st}");
                }
                times.push(t.elapsed().as_secs_f64());
            }
        }
        Ok(out)
    }

    fn dns_exec_table(&mut self, exec: &[(&'static str, Vec<f64>)]) {
        self.table.section(
            "D4. DNS: `pipeguard exec --policy P -- true` wall time (load, verify, compile, fill maps, attach, tear down)",
            &["policy", "wall time, median (min–max)", "minus the previous row"],
        );
        let mut arr = Json::Arr(Vec::new());
        let mut previous: Option<f64> = None;
        for (cfg, times) in exec {
            let s = summarize(times);
            let mut o = Json::obj();
            o.set("config", *cfg).set("exec_seconds", s);
            arr.push(o);
            self.table.row(vec![
                super::configs::label(cfg).to_string(),
                format!("{:.0} ms ({:.0}–{:.0})", s.median * 1e3, s.min * 1e3, s.max * 1e3),
                previous.map_or("—".to_string(), |p| format!("{:+.0} ms", (s.median - p) * 1e3)),
            ]);
            previous = Some(s.median);
        }
        self.figures.set("dns_exec", arr);
    }
}

fn worker_key(cfg: &str) -> &str {
    if cfg == "base" { BASE_WORKER } else { cfg }
}

/// Run-time statistics of every program a worker's `pipeguard exec` holds.
fn hook_stats(me: &mut Bench, key: &str) -> Result<BTreeMap<String, kernel::RunStats>> {
    let pid = me.worker(key)?.pid();
    kernel::process_prog_stats(pid)
}

/// DNS (UDP 53) and a non-DNS UDP port to the resolver by IP rule; the loopback server by
/// IP rule (`names` = 0) or by a domain rule listing `names` names, the queried ones first.
fn dns_policy(names: usize) -> String {
    let mut y = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: bench-dns, namespace: default}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: {RESOLVER}/32}}}}]\n    ports: [{{protocol: UDP, port: 53}}, {{protocol: UDP, port: {NON_DNS_PORT}}}]\n"
    );
    if names == 0 {
        y.push_str("  - to: [{ipBlock: {cidr: 127.0.0.1/32}}]\n");
        return y;
    }
    y.push_str("---\napiVersion: pipeguard.dev/v1alpha1\nkind: DomainPolicy\nmetadata: {name: bench-names, namespace: default}\nspec:\n  podSelector: {}\n  egress:\n  - domains:\n");
    for i in 0..names {
        let _ = writeln!(y, "    - {}", name(i));
    }
    let _ = writeln!(y, "    ports: [{{port: {PORT_CRR}}}]");
    y
}

/// dnsmasq in the namespace on `RESOLVER`:53, answering the queried names with 127.0.0.1
/// from a hosts file (no query log: its writes would be the bottleneck), on the CPU the
/// workers use. Killed on drop.
struct Dnsmasq {
    child: Child,
}

impl Dnsmasq {
    fn start(ns: &str, dir: &Path) -> Result<Self> {
        let hosts = dir.join("dns-hosts");
        let mut text = String::new();
        for i in 0..QUERIED_NAMES {
            let _ = writeln!(text, "127.0.0.1 {}", name(i));
        }
        fs::write(&hosts, text)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, "dnsmasq"])
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--port=53",
                "--local-ttl=300",
                // Keeps reading the hosts file under target/ possible whatever its modes.
                "--user=root",
            ])
            .arg(format!("--listen-address={RESOLVER}"))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg(format!("--log-facility={}", dir.join("dnsmasq.log").display()))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if cpus() >= 2 {
            let cpu = cpus() - 1;
            // SAFETY: only sched_setaffinity on a stack-built set, between fork and exec.
            // The error path formats, but only runs once the call has failed.
            unsafe {
                cmd.pre_exec(move || super::pin_to(cpu).map_err(|e| std::io::Error::other(e.to_string())));
            }
        }
        let child = cmd
            .spawn()
            .context("starting dnsmasq (cargo xtask setup installs it)")?;
        Ok(Self { child })
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
