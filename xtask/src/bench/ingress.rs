//! Sections I1–I3: ingress enforcement (issue 16), on the server side. Servers in a
//! namespace of this run's own, each on addresses of its own: two unguarded (the second an
//! A/A control: how far apart two identical servers measure), one guarded
//! by `pipeguard exec` with no ingress rules (not isolated), two isolated for ingress by a
//! policy admitting the client next to 16 or 10,000 other source CIDRs, and one in a
//! scratch cgroup with empty programs. One unguarded client per path (veth from a second
//! namespace, loopback inside the servers' namespace) connects to each in interleaved
//! rounds; the kernel cost of `pg_ingress` (and of every program, per admitted
//! connection) comes from their run-time statistics on admitted connections and on SYNs
//! from a source the rules refuse.

use std::{collections::BTreeMap, fs};

use anyhow::{Result, bail};

use super::{
    Bench, Params,
    configs::{Rules, ingress_policy_yaml, label, policy_yaml},
    kernel::{self, EmptyJob, EmptyPrograms, RunStats},
    net::{PORT_CRR, Sample},
    netns::{OwnNetns, run_quiet, veth_pair},
    report::{Json, summarize},
};

/// Server configurations: key, worker key, last byte of its veth (10.203.9.X) and loopback
/// (127.0.9.X) addresses. 10.203.0.0/16 is outside every generated rule set.
const SERVERS: [(&str, &str, u8); 6] = [
    ("base", "srv-in-base", 1),
    ("base-2", "srv-in-base-2", 14),
    ("empty", "srv-in-empty", 10),
    ("ing-none", "srv-in-none", 11),
    ("ing-16", "srv-in-16", 12),
    ("ing-10k", "srv-in-10k", 13),
];
/// The client's address on the veth, which the ingress rules admit (with 127.0.0.0/8).
const CLIENT: &str = "10.203.9.2";
/// A second address of the client's, which no rule admits.
const REFUSED: &str = "10.203.9.3";
const VETH_CLIENT: &str = "cli-in-veth";
const LOOPBACK_CLIENT: &str = "cli-in-lo";

impl Bench {
    pub(super) fn ingress(&mut self, p: &Params) -> Result<()> {
        let pid = std::process::id();
        let (srv_ns, cli_ns) = (format!("pgb-insrv-{pid}"), format!("pgb-incli-{pid}"));
        let netns = [OwnNetns::create(&srv_ns)?, OwnNetns::create(&cli_ns)?];
        veth_pair(
            (&srv_ns, "pgis", "10.203.9.1/24"),
            (&cli_ns, "pgic", &format!("{CLIENT}/24")),
        )?;
        for (_, _, host) in &SERVERS[1..] {
            run_quiet(&[
                "ip",
                "-n",
                &srv_ns,
                "addr",
                "add",
                &format!("10.203.9.{host}/24"),
                "dev",
                "pgis",
            ])?;
        }
        run_quiet(&[
            "ip",
            "-n",
            &cli_ns,
            "addr",
            "add",
            &format!("{REFUSED}/24"),
            "dev",
            "pgic",
        ])?;
        self.ingress_policies()?;
        let empty = EmptyJob::create(&format!("pgbench-in-{pid}"))?;

        let outcome = self
            .ingress_workers(&srv_ns, &cli_ns, &empty.cgroup.path)
            .and_then(|()| {
                self.ingress_rate(p)?;
                self.ingress_kernel_cost(p, &empty.programs)
            });
        for key in [VETH_CLIENT, LOOPBACK_CLIENT]
            .into_iter()
            .chain(SERVERS.iter().map(|(_, key, _)| *key))
        {
            drop(self.workers.remove(key));
        }
        drop(empty);
        drop(netns);
        outcome
    }

    /// ing-none: an egress allow-all policy (guarded, not isolated for ingress); ing-16 and
    /// ing-10k: an ingress policy (egress unrestricted) admitting the generated CIDRs, the
    /// client and loopback.
    fn ingress_policies(&self) -> Result<()> {
        let rules = Rules::generate(10_000);
        fs::write(
            self.policy_path("ing-none"),
            policy_yaml("bench-ing-none", std::iter::empty(), &["0.0.0.0/0", "::/0"]),
        )?;
        let admitted = [&format!("{CLIENT}/32") as &str, "127.0.0.0/8"];
        for (cfg, n) in [("ing-16", 16), ("ing-10k", 10_000)] {
            fs::write(
                self.policy_path(cfg),
                ingress_policy_yaml(&format!("bench-{cfg}"), rules.cidrs(n), &admitted),
            )?;
        }
        Ok(())
    }

    fn ingress_workers(&mut self, srv_ns: &str, cli_ns: &str, empty_cgroup: &std::path::Path) -> Result<()> {
        for (cfg, key, host) in SERVERS {
            let (veth, lo) = (format!("10.203.9.{host}"), format!("127.0.9.{host}"));
            let args = ["server", veth.as_str(), lo.as_str()];
            let policy = cfg.starts_with("ing-").then(|| self.policy_path(cfg));
            let mut cmd = self.bench_worker(srv_ns, policy.as_deref(), None, &[], &args);
            if cfg == "empty" {
                kernel::join_on_exec(&mut cmd, empty_cgroup)?;
            }
            self.spawn(key, cmd)?;
        }
        self.spawn(VETH_CLIENT, self.client(cli_ns, None, None))?;
        self.spawn(LOOPBACK_CLIENT, self.client(srv_ns, None, None))?;
        Ok(())
    }

    /// I1: the accept rate of each server, the same client connecting to each in turn.
    fn ingress_rate(&mut self, p: &Params) -> Result<()> {
        self.table.section(
            "I1. Inbound TCP connections per second to a server (the client connects, 1-byte request and response, close): guarded servers vs an unguarded one",
            &[
                "path",
                "server",
                "absolute, median (min–max)",
                "ratio to the unguarded server, median (min–max)",
            ],
        );
        // "empty": the kernel's own cost of a cgroup with programs attached, which no program
        // of ours can take away; the guarded servers ÷ it is what pipeguard's programs cost.
        // "base-2" ÷ "base": two identical unguarded servers, what this loop cannot resolve.
        let configs = ["base", "base-2", "empty", "ing-none", "ing-16", "ing-10k"];
        for path in ["loopback", "veth"] {
            let v = self.interleave_to("crr", &configs, p.secs, p.rounds, Sample::rate, |cfg| {
                (client_of(path).to_string(), server_addr(path, cfg))
            })?;
            self.record(
                "ingress_accept_rate",
                path,
                "/s",
                &v,
                &configs,
                1.0,
                &[
                    ("ing-none", "empty"),
                    ("ing-16", "empty"),
                    ("ing-16", "ing-none"),
                    ("ing-10k", "ing-none"),
                ],
            );
        }
        Ok(())
    }

    /// I2: `pg_ingress` ns/run (bpf_stats) on admitted connections over veth, and on SYNs
    /// from the refused source, against an empty cgroup_skb ingress program.
    fn ingress_kernel_cost(&mut self, p: &Params, empty: &EmptyPrograms) -> Result<()> {
        let _stats = kernel::BpfStats::enable()?;
        let configs = ["empty", "ing-none", "ing-16", "ing-10k"];
        let inbound = ["admitted", "refused source"];
        // (config, inbound) → per-round ns/run; run and attempt totals.
        let mut per_round: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
        let mut totals: BTreeMap<(&str, &str), (RunStats, u64)> = BTreeMap::new();
        // Every program the server's cgroup runs (both skb hooks, sock_ops, ...): run time.
        let mut all_programs: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        // Admitted connections, per program: (config, program) → runs and run time.
        let mut by_program: BTreeMap<(&str, String), RunStats> = BTreeMap::new();
        for r in 0..p.kernel_rounds {
            for i in 0..configs.len() {
                let cfg = configs[(i + r) % configs.len()];
                let to = server_addr("veth", cfg);
                for kind in inbound {
                    let command = match kind {
                        "admitted" => format!("crr {to} {}", p.kernel_secs),
                        _ => format!("syn {to} {} {REFUSED}", p.kernel_secs / 2.0),
                    };
                    let before = self.server_stats(cfg, empty)?;
                    let s = self.worker(VETH_CLIENT)?.ask(&command)?;
                    let after = self.server_stats(cfg, empty)?;
                    let d = after.ingress.since(before.ingress);
                    *all_programs.entry((cfg, kind)).or_default() += after.all.since(before.all).run_time_ns;
                    if kind == "admitted" {
                        for (name, now) in &after.programs {
                            let d = now.since(before.programs.get(name).copied().unwrap_or_default());
                            let t = by_program.entry((cfg, name.clone())).or_default();
                            t.run_time_ns += d.run_time_ns;
                            t.run_cnt += d.run_cnt;
                        }
                    }
                    if d.run_cnt == 0 {
                        bail!("{cfg}: the ingress program never ran on {kind} connections");
                    }
                    per_round
                        .entry((cfg, kind))
                        .or_default()
                        .push(d.run_time_ns as f64 / d.run_cnt as f64);
                    let t = totals.entry((cfg, kind)).or_default();
                    t.0.run_time_ns += d.run_time_ns;
                    t.0.run_cnt += d.run_cnt;
                    t.1 += s.ops;
                }
            }
        }
        self.table.section(
            "I2. Kernel cost of the ingress hook per run (kernel.bpf_stats_enabled; veth: admitted connections as in I1, and SYNs from a source the rules refuse, each socket closed at once)",
            &[
                "server",
                "inbound",
                "runs",
                "runs per connection",
                "ns/run raw, median (min–max)",
                "ns/run net of empty program",
                "all programs, ns per connection",
            ],
        );
        let mut arr = Json::Arr(Vec::new());
        for kind in inbound {
            let (empty_t, _) = totals[&("empty", kind)];
            let empty_ns = empty_t.run_time_ns as f64 / empty_t.run_cnt as f64;
            for cfg in configs {
                let (t, attempts) = totals[&(cfg, kind)];
                let raw = t.run_time_ns as f64 / t.run_cnt as f64;
                let per_conn = t.run_cnt as f64 / attempts.max(1) as f64;
                // A refused SYN is dropped: no SYN-ACK, so no RST from the closed socket.
                if kind != "admitted" && cfg.starts_with("ing-1") && per_conn > 1.5 {
                    bail!("{cfg}: {per_conn:.2} ingress runs per refused SYN: the SYNs were answered");
                }
                let s = summarize(&per_round[&(cfg, kind)]);
                let net = (cfg != "empty").then_some(raw - empty_ns);
                let all_per_conn = all_programs[&(cfg, kind)] as f64 / attempts.max(1) as f64;
                let mut o = Json::obj();
                o.set("config", cfg)
                    .set("inbound", kind)
                    .set("run_cnt", t.run_cnt)
                    .set("run_time_ns", t.run_time_ns)
                    .set("attempts", attempts)
                    .set("ns_per_run", raw)
                    .set("ns_per_run_rounds", s)
                    .set("ns_per_run_net_of_empty", net)
                    .set("all_programs_ns_per_connection", all_per_conn);
                arr.push(o);
                self.table.row(vec![
                    server_label(cfg).to_string(),
                    kind.to_string(),
                    t.run_cnt.to_string(),
                    format!("{per_conn:.2}"),
                    format!("{raw:.0} ({:.0}–{:.0})", s.min, s.max),
                    net.map_or("—".to_string(), |n| format!("{n:.0}")),
                    format!("{all_per_conn:.0}"),
                ]);
            }
        }
        self.figures.set("ingress_kernel_ns_per_run", arr);
        self.per_program_cost(&configs, &by_program, &totals);
        Ok(())
    }

    /// I3: where an admitted connection's kernel time goes, program by program.
    fn per_program_cost(
        &mut self,
        configs: &[&str],
        by_program: &BTreeMap<(&str, String), RunStats>,
        totals: &BTreeMap<(&str, &str), (RunStats, u64)>,
    ) {
        self.table.section(
            "I3. Each program's share of an admitted connection (kernel.bpf_stats_enabled, as in I2)",
            &[
                "server",
                "program",
                "runs per connection",
                "ns/run",
                "ns per connection",
            ],
        );
        let mut arr = Json::Arr(Vec::new());
        for &cfg in configs {
            let connections = totals[&(cfg, "admitted")].1.max(1) as f64;
            for ((_, name), t) in by_program
                .range((cfg, String::new())..)
                .take_while(|((c, _), _)| *c == cfg)
            {
                if t.run_cnt == 0 {
                    continue;
                }
                let (runs, per_run) = (
                    t.run_cnt as f64 / connections,
                    t.run_time_ns as f64 / t.run_cnt as f64,
                );
                let mut o = Json::obj();
                o.set("config", cfg)
                    .set("program", name.as_str())
                    .set("runs_per_connection", runs)
                    .set("ns_per_run", per_run)
                    .set("ns_per_connection", runs * per_run);
                arr.push(o);
                self.table.row(vec![
                    server_label(cfg).to_string(),
                    name.clone(),
                    format!("{runs:.2}"),
                    format!("{per_run:.0}"),
                    format!("{:.0}", runs * per_run),
                ]);
            }
        }
        self.figures.set("ingress_program_cost", arr);
    }

    /// Run-time statistics of the programs `cfg`'s server runs under: its ingress program,
    /// and all of them summed.
    fn server_stats(&mut self, cfg: &str, empty: &EmptyPrograms) -> Result<ServerStats> {
        let (stats, ingress) = if cfg == "empty" {
            (empty.stats()?, "ingress")
        } else {
            let pid = self.worker(server_key(cfg))?.pid();
            (kernel::process_prog_stats(pid)?, "pg_ingress")
        };
        let ingress = *stats
            .get(ingress)
            .ok_or_else(|| anyhow::anyhow!("{cfg}: no ingress program"))?;
        let all = stats.values().fold(RunStats::default(), |sum, s| RunStats {
            run_time_ns: sum.run_time_ns + s.run_time_ns,
            run_cnt: sum.run_cnt + s.run_cnt,
        });
        Ok(ServerStats {
            ingress,
            all,
            programs: stats,
        })
    }
}

struct ServerStats {
    ingress: RunStats,
    all: RunStats,
    /// By program name.
    programs: BTreeMap<String, RunStats>,
}

fn server_key(cfg: &str) -> &'static str {
    SERVERS
        .iter()
        .find(|(c, _, _)| *c == cfg)
        .map_or("?", |(_, key, _)| key)
}

fn server_addr(path: &str, cfg: &str) -> String {
    let host = SERVERS
        .iter()
        .find(|(c, _, _)| *c == cfg)
        .map_or(0, |(_, _, host)| *host);
    match path {
        "loopback" => format!("127.0.9.{host}:{PORT_CRR}"),
        _ => format!("10.203.9.{host}:{PORT_CRR}"),
    }
}

fn client_of(path: &str) -> &'static str {
    if path == "loopback" {
        LOOPBACK_CLIENT
    } else {
        VETH_CLIENT
    }
}

fn server_label(cfg: &str) -> &'static str {
    match cfg {
        "empty" => "empty program",
        other => label(other),
    }
}
