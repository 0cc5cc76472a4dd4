//! Summaries (median and spread), a minimal JSON writer, and the Markdown table.

use std::fmt::Write as _;

/// Median and spread of a set of rounds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p10: f64,
    pub p90: f64,
}

pub fn summarize(values: &[f64]) -> Summary {
    if values.is_empty() {
        return Summary::default();
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| -> f64 {
        let pos = p * (v.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
    };
    Summary {
        n: v.len(),
        median: q(0.5),
        min: v[0],
        max: v[v.len() - 1],
        p10: q(0.1),
        p90: q(0.9),
    }
}

/// A JSON value, enough for the report.
#[derive(Clone, Debug)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
    /// Already-rendered JSON (from the control-plane bench), inserted as is.
    Raw(String),
}

impl Json {
    pub fn obj() -> Self {
        Json::Obj(Vec::new())
    }

    pub fn set(&mut self, key: &str, value: impl Into<Json>) -> &mut Self {
        if let Json::Obj(fields) = self {
            fields.retain(|(k, _)| k != key);
            fields.push((key.to_string(), value.into()));
        }
        self
    }

    pub fn push(&mut self, value: impl Into<Json>) {
        if let Json::Arr(items) = self {
            items.push(value.into());
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out.push('\n');
        out
    }

    fn write(&self, out: &mut String, indent: usize) {
        let pad = |n: usize| "  ".repeat(n);
        match self {
            Json::Null => out.push_str("null"),
            Json::Raw(text) => out.push_str(text),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) if n.is_finite() => {
                if n.fract() == 0.0 && n.abs() < 1e15 {
                    let _ = write!(out, "{}", *n as i64);
                } else {
                    let _ = write!(out, "{n:.6}");
                }
            }
            Json::Num(_) => out.push_str("null"),
            Json::Str(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        c if (c as u32) < 0x20 => {
                            let _ = write!(out, "\\u{:04x}", c as u32);
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Json::Arr(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push_str("[\n");
                for (i, item) in items.iter().enumerate() {
                    out.push_str(&pad(indent + 1));
                    item.write(out, indent + 1);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(indent));
                out.push(']');
            }
            Json::Obj(fields) => {
                if fields.is_empty() {
                    out.push_str("{}");
                    return;
                }
                out.push_str("{\n");
                for (i, (k, v)) in fields.iter().enumerate() {
                    out.push_str(&pad(indent + 1));
                    Json::Str(k.clone()).write(out, indent + 1);
                    out.push_str(": ");
                    v.write(out, indent + 1);
                    out.push_str(if i + 1 < fields.len() { ",\n" } else { "\n" });
                }
                out.push_str(&pad(indent));
                out.push('}');
            }
        }
    }
}

impl From<f64> for Json {
    fn from(v: f64) -> Self {
        Json::Num(v)
    }
}
impl From<u64> for Json {
    fn from(v: u64) -> Self {
        Json::Num(v as f64)
    }
}
impl From<usize> for Json {
    fn from(v: usize) -> Self {
        Json::Num(v as f64)
    }
}
impl From<bool> for Json {
    fn from(v: bool) -> Self {
        Json::Bool(v)
    }
}
impl From<&str> for Json {
    fn from(v: &str) -> Self {
        Json::Str(v.to_string())
    }
}
impl From<String> for Json {
    fn from(v: String) -> Self {
        Json::Str(v)
    }
}
impl From<Vec<f64>> for Json {
    fn from(v: Vec<f64>) -> Self {
        Json::Arr(v.into_iter().map(Json::Num).collect())
    }
}
impl<T: Into<Json>> From<Option<T>> for Json {
    fn from(v: Option<T>) -> Self {
        v.map_or(Json::Null, Into::into)
    }
}
impl From<Summary> for Json {
    fn from(s: Summary) -> Self {
        let mut o = Json::obj();
        o.set("n", s.n)
            .set("median", s.median)
            .set("min", s.min)
            .set("max", s.max)
            .set("p10", s.p10)
            .set("p90", s.p90);
        o
    }
}

/// A Markdown table, printed as the run goes and collected for the end.
#[derive(Default)]
pub struct Table {
    pub sections: Vec<(String, Vec<String>, Vec<Vec<String>>)>,
}

impl Table {
    pub fn section(&mut self, title: &str, header: &[&str]) {
        self.sections.push((
            title.to_string(),
            header.iter().map(|s| s.to_string()).collect(),
            Vec::new(),
        ));
    }

    pub fn row(&mut self, cells: Vec<String>) {
        if let Some((title, header, rows)) = self.sections.last_mut() {
            if rows.is_empty() {
                println!("\n### {title}\n");
                println!("| {} |", header.join(" | "));
                println!("|{}", " --- |".repeat(header.len()));
            }
            println!("| {} |", cells.join(" | "));
            rows.push(cells);
        }
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for (title, header, rows) in &self.sections {
            let _ = writeln!(out, "\n### {title}\n");
            let _ = writeln!(out, "| {} |", header.join(" | "));
            let _ = writeln!(out, "|{}", " --- |".repeat(header.len()));
            for r in rows {
                let _ = writeln!(out, "| {} |", r.join(" | "));
            }
        }
        out
    }
}

/// 12345.6 → "12.3k", for rates.
pub fn si(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.1}")
    }
}

/// "0.973 (0.95–0.99)"
pub fn ratio(s: &Summary) -> String {
    format!("{:.3} ({:.3}–{:.3})", s.median, s.min, s.max)
}

pub fn abs(s: &Summary, unit: &str) -> String {
    format!("{}{unit} ({}–{})", si(s.median), si(s.min), si(s.max))
}
