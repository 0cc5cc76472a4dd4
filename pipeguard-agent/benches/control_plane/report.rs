//! Summaries, the Markdown tables and the JSON document of the control-plane benchmark.

use std::time::Duration;

use serde_json::{Value, json};

/// Percentiles of a set of samples, in milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn summarize(samples: &[Duration]) -> Summary {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    assert!(!ms.is_empty(), "no samples to summarize");
    // Nearest rank: with fewer than 100 samples, p99 is the maximum.
    let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    Summary {
        n: ms.len(),
        min: ms[0],
        p50: rank(0.5),
        p99: rank(0.99),
        max: ms[ms.len() - 1],
    }
}

impl Summary {
    pub fn json(&self) -> Value {
        json!({"n": self.n, "min_ms": self.min, "p50_ms": self.p50, "p99_ms": self.p99, "max_ms": self.max})
    }

    /// "p50 (min–max)" for the tables.
    pub fn cell(&self) -> String {
        format!("{} ({}–{})", ms(self.p50), ms(self.min), ms(self.max))
    }
}

pub fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.0} ms")
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[derive(Default)]
pub struct Report {
    sections: Vec<(String, Vec<String>, Vec<Vec<String>>)>,
    figures: serde_json::Map<String, Value>,
}

impl Report {
    pub fn section(&mut self, title: &str, header: &[&str]) {
        self.sections.push((
            title.to_string(),
            header.iter().map(|h| h.to_string()).collect(),
            Vec::new(),
        ));
        eprintln!("control_plane: {title}");
    }

    pub fn row(&mut self, cells: Vec<String>) {
        eprintln!("  {}", cells.join(" | "));
        self.sections.last_mut().expect("a section first").2.push(cells);
    }

    pub fn figure(&mut self, key: &str, value: Value) {
        self.figures.insert(key.to_string(), value);
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for (title, header, rows) in &self.sections {
            out.push_str(&format!("\n### {title}\n\n| {} |\n|", header.join(" | ")));
            out.push_str(&" --- |".repeat(header.len()));
            out.push('\n');
            for row in rows {
                out.push_str(&format!("| {} |\n", row.join(" | ")));
            }
        }
        out
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(&Value::Object(self.figures.clone())).expect("plain values")
    }
}
