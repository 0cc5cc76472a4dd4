//! The event reader's own ceiling: what the agent does per ring buffer record (decode and
//! aggregate), on records built in memory. The end-to-end figure, through the kernel's
//! ring, is in the data-path bench; on two CPUs one producer cannot reach this ceiling.

use std::time::Instant;

use pipeguard::{
    engine::events::{Clock, decode},
    events::{
        aggregate::Aggregator,
        pipeline::{MAX_KEYS, WINDOW},
    },
};
use pipeguard_common::{Event, Hook, PROTO_TCP, VERDICT_DENY};
use serde_json::json;

use super::report::Report;

/// A denied connect to 10.0.x.y:port; `n` distinct destinations over the run.
fn record(i: u64, destinations: u64) -> Vec<u8> {
    let d = i % destinations;
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..16].copy_from_slice(&[10, 0, (d >> 8) as u8, d as u8]);
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"curl");
    let event = Event {
        timestamp_ns: i,
        cgroup_id: 7,
        pod_cgroup_id: 5,
        addr,
        pid: 11,
        tgid: 10,
        comm,
        policy_id: 1,
        port: 443,
        protocol: PROTO_TCP,
        family: 4,
        hook: Hook::Connect4 as u8,
        verdict: VERDICT_DENY,
        ..Event::default()
    };
    bytemuck::bytes_of(&event).to_vec()
}

pub fn run(quick: bool, report: &mut Report) {
    let n: u64 = if quick { 200_000 } else { 2_000_000 };
    report.section(
        "6b. Event reader ceiling in user space (decode + aggregate per record, records built in memory)",
        &[
            "records",
            "distinct destinations",
            "records/s",
            "aggregated records out",
        ],
    );
    let mut figures = Vec::new();
    for destinations in [1, 1_000] {
        let records: Vec<Vec<u8>> = (0..n).map(|i| record(i, destinations)).collect();
        let clock = Clock::now();
        let mut aggregator = Aggregator::new(WINDOW, MAX_KEYS);
        let mut out = 0usize;
        let start = Instant::now();
        for bytes in &records {
            let violation = decode(bytes, &clock).expect("a well-formed record");
            out += aggregator.add(violation, start).len();
        }
        out += aggregator.flush_all().len();
        let elapsed = start.elapsed();
        let rate = n as f64 / elapsed.as_secs_f64();
        report.row(vec![
            n.to_string(),
            destinations.to_string(),
            format!("{:.2}M", rate / 1e6),
            out.to_string(),
        ]);
        figures.push(json!({
            "records": n, "destinations": destinations, "records_per_second": rate, "records_out": out,
        }));
    }
    report.figure("event_reader", json!(figures));
}
