//! Sections 1-3 (connections, request/response, stream, UDP) and 5b (memory of each configuration).

use anyhow::Result;

use super::{
    net::{PORT_CRR, PORT_RR, PORT_STREAM, PORT_UDP, Sample},
    report::Json,
};

use super::{
    Bench, Params,
    configs::{PG_CONFIGS, label},
    kernel,
};

impl Bench {
    pub(super) fn throughput(&mut self, p: &Params) -> Result<()> {
        let (rounds, secs) = (p.rounds, p.secs);
        let header = [
            "path",
            "configuration",
            "absolute, median (min–max)",
            "ratio to no enforcement, median (min–max)",
        ];
        let rate: fn(&Sample) -> f64 = Sample::rate;
        let bits: fn(&Sample) -> f64 = |s| s.byte_rate() * 8.0;

        self.table.section(
            "1. New TCP connections per second (connect, 1-byte request and response, close)",
            &header,
        );
        // "empty": a job's cgroup with empty programs at every hook, the floor any cgroup-BPF
        // enforcement starts from; "pipeguard ÷ empty" is what pipeguard's own code costs.
        let lo = ["base", "empty", "pg-allow", "pg-10k", "pg-100k"];
        let v = self.interleave("crr", "loopback", PORT_CRR, &lo, secs, rounds, rate)?;
        self.record(
            "conn_rate",
            "loopback",
            "/s",
            &v,
            &lo,
            1.0,
            &[("pg-10k", "empty")],
        );
        let veth = [
            "base", "empty", "pg-allow", "pg-10k", "pg-100k", "ipt-10k", "nft-10k",
        ];
        let v = self.interleave("crr", "veth", PORT_CRR, &veth, secs, rounds, rate)?;
        self.record(
            "conn_rate",
            "veth",
            "/s",
            &v,
            &veth,
            1.0,
            &[("pg-10k", "empty"), ("pg-10k", "ipt-10k"), ("pg-10k", "nft-10k")],
        );

        let configs = ["base", "empty", "pg-10k"];
        for (title, test, verb, port, unit, metric) in [
            (
                "2a. Request/response on one connection (1-byte ping-pong), transactions per second",
                "rr",
                "rr",
                PORT_RR,
                "/s",
                rate,
            ),
            (
                "2b. Single-stream throughput (64 KiB writes)",
                "stream",
                "stream",
                PORT_STREAM,
                "bit/s",
                bits,
            ),
            (
                "3. Unconnected UDP sendto (64-byte datagrams), datagrams per second",
                "udp_sendto",
                "udp",
                PORT_UDP,
                "/s",
                rate,
            ),
        ] {
            self.table.section(title, &header);
            for path in ["loopback", "veth"] {
                let v = self.interleave(verb, path, port, &configs, secs, rounds, metric)?;
                self.record(test, path, unit, &v, &configs, 1.0, &[("pg-10k", "empty")]);
            }
        }
        Ok(())
    }

    /// RSS of each pipeguard exec and the BPF memory it holds.
    pub(super) fn memory(&mut self, when: &str) -> Result<()> {
        let mut arr = Json::Arr(Vec::new());
        for (cfg, n) in PG_CONFIGS {
            let pid = self.worker(cfg)?.pid();
            let (rss, hwm) = kernel::process_rss_kib(pid)?;
            let (maps, progs, nmaps) = kernel::process_bpf_memory(pid)?;
            let mut o = Json::obj();
            o.set("config", cfg)
                .set("cidrs", n)
                .set("when", when)
                .set("vm_rss_kib", rss)
                .set("vm_hwm_kib", hwm)
                .set("bpf_map_memlock_bytes", maps)
                .set("bpf_prog_memlock_bytes", progs)
                .set("bpf_maps", nmaps);
            arr.push(o);
            self.memory_rows.push(vec![
                label(cfg).to_string(),
                when.to_string(),
                format!("{:.1} MiB", rss as f64 / 1024.0),
                format!("{:.1} MiB", hwm as f64 / 1024.0),
                format!("{:.1} MiB ({nmaps} maps)", maps as f64 / 1048576.0),
                format!("{:.2} MiB", progs as f64 / 1048576.0),
            ]);
        }
        self.figures
            .set(&format!("memory_{}", when.replace(' ', "_")), arr);
        Ok(())
    }
}
