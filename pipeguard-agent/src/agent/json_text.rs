//! Any serde value written out as compact JSON text while it is read, from any
//! deserializer: serde_json's (a watch line read in order) or serde's buffer (a watch
//! event whose "object" came before its "type"). A `serde_json::Value` on the way would
//! be a tree of maps, ~1.3 KB for every `{"ipBlock": {"cidr": …}}` of a policy: more than
//! 100 MiB of peak for a 100k-CIDR policy, where the text is 4 MB.

use std::fmt::{self, Write as _};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// The value `deserializer` holds, as JSON text.
pub fn read<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let mut out = String::new();
    JsonText {
        out: &mut out,
        comma: false,
    }
    .deserialize(deserializer)?;
    Ok(out)
}

/// Appends one value to `out`, after a comma when it follows another element.
struct JsonText<'a> {
    out: &'a mut String,
    comma: bool,
}

impl JsonText<'_> {
    fn start(self) -> Self {
        if self.comma {
            self.out.push(',');
        }
        self
    }

    fn quoted<E: de::Error>(self, text: &str) -> Result<(), E> {
        let out = self.start().out;
        out.push_str(&serde_json::to_string(text).map_err(E::custom)?);
        Ok(())
    }

    fn literal<E>(self, text: impl fmt::Display) -> Result<(), E> {
        let out = self.start().out;
        let _ = write!(out, "{text}");
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for JsonText<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonText<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.literal(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.literal(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.literal(v)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // serde_json's own float text (and `null` for what JSON cannot hold).
        let text = serde_json::to_string(&v).map_err(E::custom)?;
        self.literal(text)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.quoted(v)
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.literal("null")
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.literal("null")
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.start().out;
        out.push('[');
        let mut comma = false;
        while seq
            .next_element_seed(JsonText {
                out: &mut *out,
                comma,
            })?
            .is_some()
        {
            comma = true;
        }
        out.push(']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.start().out;
        out.push('{');
        let mut comma = false;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            JsonText {
                out: &mut *out,
                comma,
            }
            .quoted::<A::Error>(&key)?;
            out.push(':');
            map.next_value_seed(JsonText {
                out: &mut *out,
                comma: false,
            })?;
            comma = true;
        }
        out.push('}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize as _;

    use super::read;

    #[test]
    fn the_text_is_the_value_compacted() {
        let input = r#" { "a" : [ 1, -2, 2.5, true, null, "x\"y\u00e9" ], "b": {}, "c": [], "d": {"e": {"f": 18446744073709551615}} } "#;
        let text = read(&mut serde_json::Deserializer::from_str(input)).unwrap();
        assert_eq!(
            text,
            r#"{"a":[1,-2,2.5,true,null,"x\"yé"],"b":{},"c":[],"d":{"e":{"f":18446744073709551615}}}"#
        );
        let same: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(same, serde_json::from_str::<serde_json::Value>(input).unwrap());
    }

    /// serde's buffer (an adjacently tagged enum whose content came first) reads the same.
    #[test]
    fn a_buffered_value_reads_the_same() {
        #[derive(serde::Deserialize)]
        #[serde(tag = "type", content = "object")]
        enum Event {
            Added(#[serde(deserialize_with = "read")] String),
        }
        let line = r#"{"object": {"spec": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "n": 7}, "type": "Added"}"#;
        let Event::Added(text) = Event::deserialize(&mut serde_json::Deserializer::from_str(line)).unwrap();
        assert_eq!(text, r#"{"spec":[{"ipBlock":{"cidr":"10.0.0.0/8"}}],"n":7}"#);
    }
}
