//! Text from jobs (process names, executables, names) made safe to show to people: a job
//! can rename itself (`PR_SET_NAME`) to escape sequences or a newline plus a forged line.
//! Every control character (C0, DEL, C1) and every bidirectional-override or invisible
//! format character is written as a visible escape, so one record stays one line and shows
//! what the job really set.

use std::borrow::Cow;

/// `s` with control and format characters as `\n`, `\r`, `\t` or `\u{XX}`; a backslash
/// becomes `\\` so an escape cannot be forged either.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A Prometheus label value, escaped as the text format requires (`\\`, `\"`, `\n`) when
/// encoded: pod and policy names are chosen by cluster users and must not add lines to
/// /metrics.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct LabelValue(pub String);

impl From<String> for LabelValue {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for LabelValue {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

impl prometheus_client::encoding::EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(c as u32,
            0x200B..=0x200F // zero-width and direction marks
            | 0x2028 | 0x2029 // line and paragraph separators
            | 0x202A..=0x202E // bidirectional embedding and override
            | 0x2060..=0x2069 // word joiner, invisible operators, bidirectional isolates
            | 0x061C | 0xFEFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_format_characters_become_visible_escapes() {
        assert!(matches!(printable("curl"), Cow::Borrowed("curl")));
        let hostile = "\x1b[2K\r\x1b[8mx\nOK: all clear\u{9b}\u{202e}";
        let shown = printable(hostile);
        assert_eq!(shown, "\\u{1b}[2K\\r\\u{1b}[8mx\\nOK: all clear\\u{9b}\\u{202e}");
        assert!(!shown.chars().any(|c| c.is_control()));
        assert_eq!(
            printable("a\\nb"),
            "a\\\\nb",
            "a literal backslash-n is not a newline"
        );
        assert_eq!(printable("büro-ü"), "büro-ü", "ordinary non-ASCII stays");
    }

    #[test]
    fn label_values_cannot_add_lines_to_metrics() {
        use prometheus_client::{
            encoding::{EncodeLabelSet, text::encode},
            metrics::{family::Family, gauge::Gauge},
            registry::Registry,
        };
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct L {
            pod: LabelValue,
        }
        let family = Family::<L, Gauge>::default();
        family
            .get_or_create(&L {
                pod: "a\"} 1\npipeguard_ready 1\n#\\".into(),
            })
            .set(7);
        let mut registry = Registry::default();
        registry.register("x", "x", family);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        let line = out.lines().find(|l| l.starts_with("x{")).unwrap();
        assert_eq!(line, r#"x{pod="a\"} 1\npipeguard_ready 1\n#\\"} 7"#);
        assert!(!out.lines().any(|l| l.starts_with("pipeguard_ready")), "{out}");
    }
}
