//! Section 4: ns per program run from the kernel's run-time statistics, net of empty programs.

use std::{collections::BTreeMap, os::unix::process::CommandExt as _};

use anyhow::Result;

use super::{
    kernel::RunStats,
    net::{PORT_CRR, PORT_UDP},
    report::{Json, summarize},
};

use super::{
    Bench, NS_CLIENT, Params,
    configs::{addr, label},
    kernel,
};

impl Bench {
    /// ns per program run from the kernel's run-time statistics, net of empty programs.
    pub(super) fn kernel_cost(&mut self, p: &Params) -> Result<()> {
        let _stats = kernel::BpfStats::enable()?;
        let cgroup = kernel::ScratchCgroup::create(&format!("pgbench-{}", std::process::id()))?;
        let empty = kernel::EmptyPrograms::attach(&cgroup.path)?;
        let mut cmd = self.client(NS_CLIENT, None, None);
        let procs = std::ffi::CString::new(
            cgroup
                .path
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )?;
        // SAFETY: open/write/close only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.spawn("empty", cmd)?;

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
        if let Some(w) = self.workers.remove("empty") {
            w.finish()?;
        }
        drop(empty);
        drop(cgroup);

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
