//! Section 4: ns per program run from the kernel's run-time statistics, net of empty programs.

use std::collections::BTreeMap;

use anyhow::Result;

use super::{
    kernel::RunStats,
    net::{PORT_CRR, PORT_UDP},
    report::{Json, summarize},
};

use super::{
    Bench, Params,
    configs::{addr, label},
    kernel::{self, EmptyJob},
};

impl Bench {
    /// ns per program run from the kernel's run-time statistics, net of empty programs.
    pub(super) fn kernel_cost(&mut self, p: &Params, empty: &EmptyJob) -> Result<()> {
        let _stats = kernel::BpfStats::enable()?;
        let empty = &empty.programs;

        let configs = ["empty", "pg-allow", "pg-1k", "pg-10k", "pg-100k"];
        // (config, hook) → per-round ns/run, and totals.
        let mut per_round: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
        let mut totals: BTreeMap<(String, String), RunStats> = BTreeMap::new();
        let stats_of = |me: &mut Self, cfg: &str| -> Result<BTreeMap<String, RunStats>> {
            if cfg == "empty" {
                empty.stats()
            } else {
                let pid = me.worker(cfg)?.pid();
                Ok(kernel::process_prog_stats(pid)?
                    .into_iter()
                    .filter_map(|(name, s)| kernel::hook_of(&name).map(|h| (h.to_string(), s)))
                    .collect())
            }
        };
        for r in 0..p.kernel_rounds {
            for i in 0..configs.len() {
                let cfg = configs[(i + r) % configs.len()];
                let before = stats_of(self, cfg)?;
                let w = self.worker(cfg)?;
                w.ask(&format!("crr {} {}", addr("veth", cfg, PORT_CRR), p.kernel_secs))?;
                w.ask(&format!(
                    "udp {} {}",
                    addr("veth", cfg, PORT_UDP),
                    p.kernel_secs / 2.0
                ))?;
                let after = stats_of(self, cfg)?;
                for (hook, a) in &after {
                    let d = a.since(before.get(hook).copied().unwrap_or_default());
                    if d.run_cnt == 0 {
                        continue;
                    }
                    let key = (cfg.to_string(), hook.clone());
                    per_round
                        .entry(key.clone())
                        .or_default()
                        .push(d.run_time_ns as f64 / d.run_cnt as f64);
                    let t = totals.entry(key).or_default();
                    t.run_time_ns += d.run_time_ns;
                    t.run_cnt += d.run_cnt;
                }
            }
        }

        self.table.section(
            "4. Kernel cost per program run (kernel.bpf_stats_enabled; veth connect loop + UDP sendto)",
            &[
                "configuration",
                "hook",
                "runs",
                "ns/run raw, median (min–max)",
                "ns/run net of empty program",
            ],
        );
        let mut arr = Json::Arr(Vec::new());
        let empty_ns: BTreeMap<String, f64> = totals
            .iter()
            .filter(|((c, _), _)| c == "empty")
            .map(|((_, h), t)| (h.clone(), t.run_time_ns as f64 / t.run_cnt as f64))
            .collect();
        for cfg in configs {
            for ((c, hook), t) in totals.iter().filter(|((c, _), _)| c == cfg) {
                let raw = t.run_time_ns as f64 / t.run_cnt as f64;
                let s = summarize(&per_round[&(c.clone(), hook.clone())]);
                let net = if cfg == "empty" {
                    None
                } else {
                    empty_ns.get(hook).map(|e| raw - e)
                };
                let mut o = Json::obj();
                o.set("config", cfg)
                    .set("hook", hook.as_str())
                    .set("run_cnt", t.run_cnt)
                    .set("run_time_ns", t.run_time_ns)
                    .set("ns_per_run", raw)
                    .set("ns_per_run_rounds", s)
                    .set("ns_per_run_net_of_empty", net);
                arr.push(o);
                self.table.row(vec![
                    label(cfg).to_string(),
                    hook.clone(),
                    t.run_cnt.to_string(),
                    format!("{raw:.0} ({:.0}–{:.0})", s.min, s.max),
                    match net {
                        Some(n) => format!("{n:.0}"),
                        None if cfg == "empty" => "—".to_string(),
                        None => "no empty counterpart (raw)".to_string(),
                    },
                ]);
            }
        }
        self.figures.set("kernel_ns_per_run", arr);
        Ok(())
    }
}

impl Bench {
    /// Section 4b: BPF_PROG_TEST_RUN of each job's `pg_egress`, issued from inside the job's
    /// cgroup (the kernel's dummy socket takes the calling task's cgroup, so the program
    /// judges a packet of that pod), on a 64-byte UDP datagram to the allowed veth
    /// destination, against an empty cgroup_skb program. The dummy socket lives for one
    /// command, so its first run is a new socket's and the rest are an established flow's.
    pub(super) fn egress_test_run(&mut self, p: &Params) -> Result<()> {
        let repeat: u32 = if p.quick { 200_000 } else { 1_000_000 };
        let rounds = p.kernel_rounds.max(3);
        let (_empty, empty_id) = kernel::empty_egress_program()?;
        let configs = ["pg-allow", "pg-10k", "pg-100k"];
        let mut ids = BTreeMap::new();
        for cfg in configs {
            let pid = self.worker(cfg)?.pid();
            ids.insert(cfg, kernel::process_prog_id(pid, "pg_egress")?);
        }
        let dest = addr("veth", "pg-10k", PORT_UDP);
        let mut ns: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for r in 0..rounds {
            let s = self
                .worker("base")?
                .ask(&format!("egress-test-run {empty_id} {dest} udp {repeat}"))?;
            ns.entry("empty").or_default().push(s.secs);
            for i in 0..configs.len() {
                let cfg = configs[(i + r) % configs.len()];
                let s = self
                    .worker(cfg)?
                    .ask(&format!("egress-test-run {} {dest} udp {repeat}", ids[cfg]))?;
                if s.ops != 1 {
                    anyhow::bail!("{cfg}: pg_egress dropped the allowed test datagram");
                }
                ns.entry(cfg).or_default().push(s.secs);
            }
        }
        self.table.section(
            &format!(
                "4b. BPF_PROG_TEST_RUN of pg_egress, a 64-byte UDP datagram to the allowed veth destination from inside the job's cgroup, {repeat} runs × {rounds} rounds"
            ),
            &["configuration", "ns/run, median (min–max)", "ns/run net of empty program"],
        );
        let empty = summarize(&ns["empty"]).median;
        let mut arr = Json::Arr(Vec::new());
        for cfg in std::iter::once("empty").chain(configs) {
            let s = summarize(&ns[cfg]);
            let net = (cfg != "empty").then_some(s.median - empty);
            let mut o = Json::obj();
            o.set("config", cfg)
                .set("repeat", u64::from(repeat))
                .set("ns_per_run", s)
                .set("ns_per_run_net_of_empty", net);
            arr.push(o);
            self.table.row(vec![
                if cfg == "empty" {
                    "empty program"
                } else {
                    label(cfg)
                }
                .to_string(),
                format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max),
                net.map_or("—".to_string(), |n| format!("{n:.0}")),
            ]);
        }
        self.figures.set("egress_test_run", arr);
        Ok(())
    }
}
