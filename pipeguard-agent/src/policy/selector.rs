//! Label selectors (matchLabels + matchExpressions), validated once, matched many times.

use std::collections::BTreeMap;

use super::model::LabelSelector;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// A validated selector. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    labels: BTreeMap<String, String>,
    expressions: Vec<(String, Op)>,
}

impl Selector {
    /// `Err((field suffix, message))`, the field relative to the selector.
    pub(super) fn parse(doc: &LabelSelector) -> Result<Self, (String, String)> {
        let mut expressions = Vec::new();
        for (i, req) in doc.match_expressions.iter().flatten().enumerate() {
            let field = format!("matchExpressions[{i}]");
            let values = req.values.clone().unwrap_or_default();
            let op = match req.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err((
                        format!("{field}.values"),
                        format!("operator {} needs at least one value", req.operator),
                    ));
                }
                "In" => Op::In(values),
                "NotIn" => Op::NotIn(values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err((
                        format!("{field}.values"),
                        format!("operator {} takes no values", req.operator),
                    ));
                }
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err((
                        format!("{field}.operator"),
                        format!("unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"),
                    ));
                }
            };
            expressions.push((req.key.clone(), op));
        }
        Ok(Self {
            labels: doc.match_labels.clone().unwrap_or_default(),
            expressions,
        })
    }

    /// `key=value` terms as matchLabels and bare `key` terms as Exists (a command-line
    /// selector such as `--guard-selector`).
    pub fn from_terms(terms: &[(String, Option<String>)]) -> Self {
        let mut selector = Self::default();
        for (key, value) in terms {
            match value {
                Some(v) => {
                    selector.labels.insert(key.clone(), v.clone());
                }
                None => selector.expressions.push((key.clone(), Op::Exists)),
            }
        }
        selector
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|(key, op)| match op {
                Op::In(values) => labels.get(key).is_some_and(|v| values.contains(v)),
                Op::NotIn(values) => labels.get(key).is_none_or(|v| !values.contains(v)),
                Op::Exists => labels.contains_key(key),
                Op::DoesNotExist => !labels.contains_key(key),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::Requirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    fn selector(match_labels: &[(&str, &str)], exprs: Vec<Requirement>) -> Selector {
        Selector::parse(&LabelSelector {
            match_labels: Some(labels(match_labels)),
            match_expressions: Some(exprs),
        })
        .unwrap()
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = Selector::parse(&LabelSelector::default()).unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_and_every_operator() {
        let pod = labels(&[("app", "runner"), ("tier", "ci")]);
        assert!(selector(&[("app", "runner")], vec![]).matches(&pod));
        assert!(!selector(&[("app", "web")], vec![]).matches(&pod));
        assert!(selector(&[], vec![expr("tier", "In", &["ci", "cd"])]).matches(&pod));
        assert!(!selector(&[], vec![expr("tier", "In", &["prod"])]).matches(&pod));
        assert!(selector(&[], vec![expr("tier", "NotIn", &["prod"])]).matches(&pod));
        assert!(
            selector(&[], vec![expr("missing", "NotIn", &["x"])]).matches(&pod),
            "NotIn matches absent keys"
        );
        assert!(selector(&[], vec![expr("app", "Exists", &[])]).matches(&pod));
        assert!(!selector(&[], vec![expr("app", "DoesNotExist", &[])]).matches(&pod));
        assert!(
            !selector(&[("app", "runner")], vec![expr("tier", "In", &["prod"])]).matches(&pod),
            "labels AND expressions"
        );
    }

    #[test]
    fn invalid_expressions_name_the_field() {
        let cases = [
            (
                expr("a", "Equals", &["x"]),
                "matchExpressions[0].operator",
                "unknown operator \"Equals\"",
            ),
            (
                expr("a", "In", &[]),
                "matchExpressions[0].values",
                "operator In needs at least one value",
            ),
            (
                expr("a", "NotIn", &[]),
                "matchExpressions[0].values",
                "operator NotIn needs at least one value",
            ),
            (
                expr("a", "Exists", &["x"]),
                "matchExpressions[0].values",
                "operator Exists takes no values",
            ),
        ];
        for (req, field, message) in cases {
            let err = Selector::parse(&LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![req]),
            })
            .unwrap_err();
            assert_eq!(err.0, field);
            assert!(err.1.starts_with(message), "{}", err.1);
        }
    }
}
