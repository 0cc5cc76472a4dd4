//! Starting the workers and running interleaved rounds against the baseline.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result};

use super::{
    net::Sample,
    report::{Json, Summary, summarize},
};

use super::{
    Bench, NS_CLIENT, NS_IPT, NS_NFT, NS_SERVER, PIN_ENV, Params,
    configs::{PG_CONFIGS, Rules, addr, label, policy_yaml},
    cpus,
    kernel::{EmptyJob, join_on_exec},
    netns::{Netns, run_quiet},
    report,
    workers::Worker,
};

/// What the data-path sections run in; dropped after the workers stopped.
pub(super) struct DataPath {
    /// The "empty programs" client's cgroup (before the namespaces: fields drop in order).
    pub empty: EmptyJob,
    _netns: Netns,
}

impl Bench {
    pub(super) fn policy_path(&self, cfg: &str) -> PathBuf {
        self.dir.join(format!("{cfg}.yaml"))
    }

    pub(super) fn in_netns(ns: &str, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }

    /// A client worker in netns `ns`, under `pipeguard exec` when a policy is given.
    pub(super) fn client(&self, ns: &str, policy: Option<&Path>, events: Option<&Path>) -> Command {
        self.bench_worker(ns, policy, events, &[], &["client"])
    }

    /// [`Self::client`] under `pipeguard exec --policy POLICY EXEC_ARGS`.
    pub(super) fn client_with(&self, ns: &str, policy: &Path, exec_args: &[&str]) -> Command {
        self.bench_worker(ns, Some(policy), None, exec_args, &["client"])
    }

    /// `xtask bench-worker ARGS` in netns `ns`, under `pipeguard exec` when a policy is given.
    /// pipeguard runs outside the namespace (`ip netns exec` remounts /sys, which hides
    /// the cgroup2 mount on hosts that have it under /sys/fs/cgroup/unified) and starts
    /// `ip netns exec NS worker` as the job; the cgroup is kept across setns.
    pub(super) fn bench_worker(
        &self,
        ns: &str,
        policy: Option<&Path>,
        events: Option<&Path>,
        exec_args: &[&str],
        args: &[&str],
    ) -> Command {
        let mut cmd = Command::new(&self.pipeguard);
        match policy {
            Some(policy) => {
                cmd.args(["exec", "--namespace", "default", "--policy"])
                    .arg(policy);
                if let Some(ev) = events {
                    cmd.arg("--events").arg(ev);
                }
                // `ip netns exec` needs CAP_SYS_ADMIN (setns, remounting /sys), which a job
                // loses by default; the bench's own worker is trusted.
                cmd.arg("--privileged-job");
                cmd.args(exec_args);
                cmd.args(["--", "ip", "netns", "exec", ns]).arg(&self.worker_bin);
            }
            None => cmd = Self::in_netns(ns, &self.worker_bin),
        }
        cmd.arg("bench-worker").args(args);
        if cpus() >= 2 {
            cmd.env(PIN_ENV, (cpus() - 1).to_string());
        }
        cmd
    }

    pub(super) fn spawn(&mut self, key: &'static str, cmd: Command) -> Result<()> {
        let t = Instant::now();
        let w = Worker::spawn(key, cmd, &self.dir)?;
        eprintln!(
            "bench: worker {key} ready in {:.2} s (pid {})",
            t.elapsed().as_secs_f64(),
            w.pid()
        );
        self.workers.insert(key, w);
        Ok(())
    }

    pub(super) fn stop_workers(&mut self) {
        // Clients before servers.
        let keys: Vec<_> = self.workers.keys().copied().collect();
        for k in keys.iter().filter(|k| !k.starts_with("srv")) {
            drop(self.workers.remove(k));
        }
        self.workers.clear();
    }

    pub(super) fn all(&mut self, p: &Params) -> Result<()> {
        self.with_data_path(|me, data_path| me.all_sections(p, data_path))
    }

    /// Runs `sections` with the data path's workers up, then stops them before the empty
    /// job's cgroup and the namespaces go, whatever `sections` returned.
    fn with_data_path(&mut self, sections: impl FnOnce(&mut Self, &DataPath) -> Result<()>) -> Result<()> {
        let data_path = self.start_data_path()?;
        let outcome = sections(self, &data_path);
        self.stop_workers();
        drop(data_path);
        outcome
    }

    fn all_sections(&mut self, p: &Params, data_path: &DataPath) -> Result<()> {
        self.memory("idle")?;

        self.throughput(p)?;
        self.memory("after load")?;
        self.kernel_cost(p, &data_path.empty)?;
        self.egress_test_run(p)?;
        self.control_plane(p)?;
        self.table.section(
            "5b. pipeguard exec process memory (RSS) and the BPF memory it holds (fdinfo memlock)",
            &[
                "configuration",
                "when",
                "VmRSS",
                "VmHWM",
                "BPF maps",
                "BPF programs",
            ],
        );
        for row in std::mem::take(&mut self.memory_rows) {
            self.table.row(row);
        }
        self.events(p)?;
        self.dns(p)?;
        self.ingress(p)
    }

    /// `--only datapath`: sections 1-4 (rates, kernel cost per run, test runs), nothing else.
    pub(super) fn data_path(&mut self, p: &Params) -> Result<()> {
        self.with_data_path(|me, data_path| {
            me.throughput(p)?;
            me.kernel_cost(p, &data_path.empty)?;
            me.egress_test_run(p)
        })
    }

    /// Policies, namespaces, firewall rules, servers and every client worker.
    fn start_data_path(&mut self) -> Result<DataPath> {
        let t = Instant::now();
        let rules = Rules::generate(100_000);
        for (cfg, n) in PG_CONFIGS {
            let extra: &[&str] = if n == 0 {
                &["0.0.0.0/0", "::/0"]
            } else {
                &["10.203.0.1/32", "127.0.0.1/32"]
            };
            fs::write(
                self.policy_path(cfg),
                policy_yaml(&format!("bench-{cfg}"), rules.cidrs(n), extra),
            )?;
        }
        let netns = Netns::setup()?;
        self.firewalls(&rules)?;
        eprintln!(
            "bench: policies, namespaces and firewall rules ready in {:.1} s",
            t.elapsed().as_secs_f64()
        );

        let (srv, lo) = (
            Self::in_netns(NS_SERVER, &self.worker_bin),
            Self::in_netns(NS_CLIENT, &self.worker_bin),
        );
        let mut srv = srv;
        srv.args(["bench-worker", "server", "0.0.0.0"]);
        let mut lo = lo;
        lo.args(["bench-worker", "server", "127.0.0.1"]);
        if cpus() >= 2 {
            srv.env(PIN_ENV, (cpus() - 1).to_string());
            lo.env(PIN_ENV, (cpus() - 1).to_string());
        }
        self.spawn("srv-veth", srv)?;
        self.spawn("srv-lo", lo)?;
        self.spawn("base", self.client(NS_CLIENT, None, None))?;
        self.spawn("ipt-10k", self.client(NS_IPT, None, None))?;
        self.spawn("nft-10k", self.client(NS_NFT, None, None))?;
        for (cfg, _) in PG_CONFIGS {
            let policy = self.policy_path(cfg);
            self.spawn(cfg, self.client(NS_CLIENT, Some(&policy), None))?;
        }
        // Last: should a spawn fail, no worker is left in a cgroup that is going away.
        let empty = EmptyJob::create(&format!("pgbench-{}", std::process::id()))?;
        let mut cmd = self.client(NS_CLIENT, None, None);
        join_on_exec(&mut cmd, &empty.cgroup.path)?;
        self.spawn("empty", cmd)?;
        Ok(DataPath { empty, _netns: netns })
    }

    pub(super) fn firewalls(&self, rules: &Rules) -> Result<()> {
        // iptables (legacy x_tables): a linear OUTPUT chain, replies of known connections
        // first as any real ruleset has them, then 10k ACCEPTs, the destination last.
        let mut ipt = String::from(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT DROP [0:0]\n-A OUTPUT -o lo -j ACCEPT\n-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n",
        );
        for c in rules.cidrs(10_000) {
            let _ = writeln!(ipt, "-A OUTPUT -d {c} -j ACCEPT");
        }
        ipt.push_str("-A OUTPUT -d 10.203.1.1/32 -j ACCEPT\nCOMMIT\n");
        let ipt_path = self.dir.join("iptables.rules");
        fs::write(&ipt_path, ipt)?;
        run_quiet(&[
            "ip",
            "netns",
            "exec",
            NS_IPT,
            "iptables-legacy-restore",
            ipt_path.to_str().context("path")?,
        ])?;

        // nftables: the same prefixes as one interval set (auto-merge folds the overlaps).
        let mut nft = String::from(
            "table inet pgbench {\n  set allow4 {\n    type ipv4_addr\n    flags interval\n    auto-merge\n    elements = {\n",
        );
        for c in rules.cidrs(10_000) {
            let _ = writeln!(nft, "      {c},");
        }
        nft.push_str("      10.203.2.1/32\n    }\n  }\n  chain out {\n    type filter hook output priority filter; policy drop;\n    oif \"lo\" accept\n    ct state established,related accept\n    ip daddr @allow4 accept\n  }\n}\n");
        let nft_path = self.dir.join("nftables.nft");
        fs::write(&nft_path, nft)?;
        run_quiet(&[
            "ip",
            "netns",
            "exec",
            NS_NFT,
            "nft",
            "-f",
            nft_path.to_str().context("path")?,
        ])?;
        Ok(())
    }

    pub(super) fn worker(&mut self, key: &str) -> Result<&mut Worker> {
        self.workers
            .get_mut(key)
            .with_context(|| format!("no worker {key}"))
    }

    /// Interleaved rounds: every round runs each configuration once, in a rotated order.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn interleave(
        &mut self,
        verb: &str,
        path: &str,
        port: u16,
        configs: &[&str],
        secs: f64,
        rounds: usize,
        metric: fn(&Sample) -> f64,
    ) -> Result<BTreeMap<String, Vec<f64>>> {
        // Each configuration's own worker, to that configuration's server.
        let target = |cfg: &str| (cfg.to_string(), addr(path, cfg, port));
        self.interleave_to(verb, configs, secs, rounds, metric, target)
    }

    /// `interleave` where `target` names, per configuration, the worker that runs the verb
    /// and the address it runs it against (the ingress section drives one client against
    /// a server per configuration).
    pub(super) fn interleave_to(
        &mut self,
        verb: &str,
        configs: &[&str],
        secs: f64,
        rounds: usize,
        metric: fn(&Sample) -> f64,
        target: impl Fn(&str) -> (String, String),
    ) -> Result<BTreeMap<String, Vec<f64>>> {
        let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        // One warm-up round, not counted.
        for cfg in configs {
            let (worker, a) = target(cfg);
            self.worker(&worker)?.ask(&format!("{verb} {a} {}", secs / 2.0))?;
        }
        for r in 0..rounds {
            for i in 0..configs.len() {
                let cfg = configs[(i + r) % configs.len()];
                let (worker, a) = target(cfg);
                let s = self.worker(&worker)?.ask(&format!("{verb} {a} {secs}"))?;
                out.entry(cfg.to_string()).or_default().push(metric(&s));
            }
        }
        Ok(out)
    }

    /// Records one test: absolute figures, per-round ratios to the baseline, table rows.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record(
        &mut self,
        test: &str,
        path: &str,
        unit: &str,
        values: &BTreeMap<String, Vec<f64>>,
        configs: &[&str],
        scale: f64,
        comparisons: &[(&str, &str)],
    ) {
        let base = &values["base"];
        for cfg in configs {
            let v = &values[*cfg];
            let abs = summarize(v);
            let ratios: Vec<f64> = v.iter().zip(base).map(|(a, b)| a / b).collect();
            let ratio = summarize(&ratios);
            let mut o = Json::obj();
            o.set("test", test)
                .set("path", path)
                .set("config", *cfg)
                .set("label", label(cfg))
                .set("unit", unit)
                .set("rounds", v.clone())
                .set("summary", abs);
            if *cfg != "base" {
                o.set("ratio_to_baseline_rounds", ratios.clone())
                    .set("ratio_to_baseline", ratio);
            }
            self.results.push(o);
            let scaled = Summary {
                median: abs.median * scale,
                min: abs.min * scale,
                max: abs.max * scale,
                ..abs
            };
            self.table.row(vec![
                path.to_string(),
                label(cfg).to_string(),
                report::abs(&scaled, unit),
                if *cfg == "base" {
                    "1".to_string()
                } else {
                    report::ratio(&ratio)
                },
            ]);
        }
        for (a, b) in comparisons {
            let ratios: Vec<f64> = values[*a].iter().zip(&values[*b]).map(|(x, y)| x / y).collect();
            let s = summarize(&ratios);
            let mut o = Json::obj();
            o.set("test", test)
                .set("path", path)
                .set("config", format!("{a}/{b}"))
                .set("label", format!("{} ÷ {}", label(a), label(b)))
                .set("ratio_rounds", ratios)
                .set("ratio", s);
            self.results.push(o);
            self.table.row(vec![
                path.to_string(),
                format!("**{} ÷ {}**", label(a), label(b)),
                String::new(),
                report::ratio(&s),
            ]);
        }
    }
}
