//! Section 5a: end-to-end `pipeguard exec` cost per policy size.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::report::{Json, summarize};

use super::{
    Bench, Params,
    configs::{PG_CONFIGS, label},
    kernel,
};

impl Bench {
    /// End-to-end `pipeguard exec --policy P -- true`: load, parse, compile, sync, attach,
    /// run, tear down. The difference to allow-all is parse + compile + sync of the CIDRs.
    pub(super) fn control_plane(&mut self, p: &Params) -> Result<()> {
        self.table.section(
            "5a. `pipeguard exec --policy P -- sleep 0.3`, wall time minus the 0.3 s job (load + parse + compile + sync + attach + teardown)",
            &["policy", "wall time, median (min–max)", "minus allow-all", "VmHWM of pipeguard"],
        );
        let mut arr = Json::Arr(Vec::new());
        let mut allow_median = 0.0;
        for (cfg, n) in PG_CONFIGS {
            let mut times = Vec::new();
            let mut hwm = 0;
            for _ in 0..p.control_reps {
                let t = Instant::now();
                let mut child = Command::new(&self.pipeguard)
                    .args(["exec", "--namespace", "default", "--policy"])
                    .arg(self.policy_path(cfg))
                    .args(["--", "sleep", "0.3"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                // Sample the high-water mark while the job runs (after compile and sync).
                let pid = child.id();
                let mut last = 0;
                while child.try_wait()?.is_none() {
                    if let Ok((_, h)) = kernel::process_rss_kib(pid) {
                        last = last.max(h);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let st = child.wait()?;
                if !st.success() {
                    bail!("pipeguard exec --policy {cfg} -- sleep failed: {st}");
                }
                times.push(t.elapsed().as_secs_f64() - 0.3);
                hwm = hwm.max(last);
            }
            let s = summarize(&times);
            if n == 0 {
                allow_median = s.median;
            }
            let mut o = Json::obj();
            o.set("config", cfg)
                .set("cidrs", n)
                .set("exec_seconds_minus_job", s)
                .set("minus_allow_all_seconds", s.median - allow_median)
                .set("vm_hwm_kib", hwm);
            arr.push(o);
            self.table.row(vec![
                label(cfg).to_string(),
                format!("{:.0} ms ({:.0}–{:.0})", s.median * 1e3, s.min * 1e3, s.max * 1e3),
                format!("{:.0} ms", (s.median - allow_median) * 1e3),
                format!("{:.1} MiB", hwm as f64 / 1024.0),
            ]);
        }
        self.figures.set("control_plane", arr);
        Ok(())
    }
}
