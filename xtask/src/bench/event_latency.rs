//! Section 6: denied attempts as events: throughput, losses and delivery latency.

use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};

use super::report::{Json, summarize};

use super::{Bench, DENIED, NS_CLIENT, Params, report};

impl Bench {
    /// Denied connects as fast as one process can make them, then paced ones for latency.
    pub(super) fn events(&mut self, p: &Params) -> Result<()> {
        let policy = self.policy_path("pg-10k");
        let file = self.dir.join("events.jsonl");
        let _ = fs::remove_file(&file);
        let cmd = self.client(NS_CLIENT, Some(&policy), Some(&file));
        self.spawn("events", cmd)?;
        let s = self
            .worker("events")?
            .ask(&format!("deny {DENIED} {}", p.events))?;
        let stderr = self.workers.remove("events").context("events worker")?.finish()?;
        let lines = fs::read_to_string(&file).unwrap_or_default().lines().count() as u64;
        let (delivered, lost) = parse_event_summary(&stderr)
            .with_context(|| format!("no events summary in pipeguard's stderr:\n{stderr}"))?;
        let attempts = parse_denied_attempts(&stderr);

        // Delivery latency: one denied connect per millisecond, the file tailed here.
        let file2 = self.dir.join("events-paced.jsonl");
        let _ = fs::remove_file(&file2);
        fs::write(&file2, "")?;
        let cmd = self.client(NS_CLIENT, Some(&policy), Some(&file2));
        self.spawn("events-paced", cmd)?;
        let tail = {
            let path = file2.clone();
            let expect = p.paced_events;
            std::thread::spawn(move || tail_latencies(&path, expect, Duration::from_secs(60)))
        };
        self.worker("events-paced")?
            .ask(&format!("paced-deny {DENIED} {}", p.paced_events))?;
        let latencies = tail.join().map_err(|_| anyhow::anyhow!("tail thread"))??;
        self.workers
            .remove("events-paced")
            .context("events worker")?
            .finish()?;
        let lat = summarize(&latencies);
        let pct = |q: f64| -> f64 {
            let mut v = latencies.clone();
            v.sort_by(|a, b| a.total_cmp(b));
            if v.is_empty() {
                return f64::NAN;
            }
            v[((v.len() - 1) as f64 * q).round() as usize]
        };

        self.table.section(
            "6. Denied-attempt events (`pipeguard exec --events FILE`, one process making denied connects)",
            &["figure", "value"],
        );
        let rate = s.ops as f64 / s.secs;
        // Events the ring buffer holds without a reader (88-byte record + 8-byte header).
        let ring_capacity = (1u64 << 22) / 96;
        let reader_floor = lines.saturating_sub(ring_capacity) as f64 / s.secs;
        let mut o = Json::obj();
        o.set("denied_connects", s.ops)
            .set("seconds", s.secs)
            .set("denied_per_second", rate)
            .set("lines_in_file", lines)
            .set("delivered_reported", delivered)
            .set("lost_reported", lost)
            .set("kernel_denied_attempts", attempts)
            .set("delivered_per_second", lines as f64 / s.secs)
            .set("ring_capacity_events", ring_capacity)
            .set("reader_events_per_second_at_least", reader_floor)
            .set("unreported_drops", s.ops as i64 as f64 - (lines + lost) as f64)
            .set("paced_events", p.paced_events)
            .set("latency_seconds", lat)
            .set("latency_p50_seconds", pct(0.5))
            .set("latency_p99_seconds", pct(0.99))
            .set("latency_samples", latencies.len());
        self.figures.set("events", o);
        for (k, v) in [
            (
                "denied connects made",
                format!("{} in {:.2} s ({}/s)", s.ops, s.secs, report::si(rate)),
            ),
            ("event lines in the file", lines.to_string()),
            (
                "events delivered per second (file lines ÷ generation time)",
                report::si(lines as f64 / s.secs),
            ),
            (
                "ring buffer reader, at least (lines beyond the 4 MiB ring's ~43.7k ÷ time)",
                format!("{}/s", report::si(reader_floor)),
            ),
            ("pipeguard summary", format!("{delivered} delivered, {lost} lost")),
            (
                "kernel deny counter",
                attempts.map_or("?".to_string(), |a| a.to_string()),
            ),
            (
                "unreported drops (connects − lines − lost)",
                format!("{}", s.ops as i64 - (lines + lost) as i64),
            ),
            (
                "delivery latency, 1 event/ms (kernel timestamp → line in file)",
                format!(
                    "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
                    pct(0.5) * 1e3,
                    pct(0.99) * 1e3,
                    lat.max * 1e3,
                    latencies.len()
                ),
            ),
        ] {
            self.table.row(vec![k.to_string(), v]);
        }
        Ok(())
    }
}

pub(super) fn parse_event_summary(stderr: &str) -> Option<(u64, u64)> {
    let line = stderr.lines().find(|l| l.trim_start().starts_with("events:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    // events: X delivered, Y lost (ring buffer full)
    Some((words.get(1)?.parse().ok()?, words.get(3)?.parse().ok()?))
}

pub(super) fn parse_denied_attempts(stderr: &str) -> Option<u64> {
    let line = stderr
        .lines()
        .find(|l| l.contains("DENIED") && l.contains(DENIED))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    words.get(2)?.parse().ok()
}

/// Follows an events file and returns, per line, now − the event's kernel timestamp.
pub(super) fn tail_latencies(path: &Path, expect: u64, timeout: Duration) -> Result<Vec<f64>> {
    let mut f = fs::File::open(path)?;
    let mut pending = String::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut pos = 0u64;
    while (out.len() as u64) < expect && Instant::now() < deadline {
        f.seek(SeekFrom::Start(pos))?;
        let mut chunk = String::new();
        let n = f.read_to_string(&mut chunk)?;
        if n == 0 {
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_secs_f64();
        pos += n as u64;
        pending.push_str(&chunk);
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            if let Some(t) = event_time(&line) {
                out.push(now - t);
            }
        }
    }
    Ok(out)
}

/// `"time":"2026-11-23T05:32:02.257522Z"` → seconds since the epoch.
pub(super) fn event_time(line: &str) -> Option<f64> {
    let start = line.find("\"time\":\"")? + 8;
    let s = line.get(start..start + 27)?;
    let num = |a: usize, b: usize| -> Option<i64> { s.get(a..b)?.parse().ok() };
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let frac: f64 = format!("0{}", s.get(19..26)?).parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3_600 + mi * 60 + sec) as f64 + frac)
}
