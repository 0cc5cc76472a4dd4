//! One error type for everything a policy file can get wrong, naming the file, the
//! document, the object and the field.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    /// The file, or another source label (e.g. `kube`).
    pub source: String,
    /// 1-based YAML document number within the file, when the file has several.
    pub document: Option<usize>,
    /// `networkpolicy NS/NAME` (or the kind and name of another object).
    pub object: Option<String>,
    /// The object's namespace, when known: an error taints every guarded pod there.
    pub namespace: Option<String>,
    /// Field path, like `spec.egress[0].to[1].ipBlock.cidr`.
    pub field: Option<String>,
    pub message: String,
}

impl PolicyError {
    pub fn file(source: &str, message: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            document: None,
            object: None,
            namespace: None,
            field: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(doc) = self.document {
            write!(f, " (document {doc})")?;
        }
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for PolicyError {}
