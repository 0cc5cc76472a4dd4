//! From the wire format to typed policies, checking everything the NetworkPolicy spec
//! forbids. Errors carry the field path; the caller adds file and object.

use ipnet::IpNet;

use super::{
    model::{IntOrString, NetworkPolicyDoc, PeerDoc, PortDoc, protocol_number},
    selector::Selector,
};

/// A valid NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// `None`: the policy does not isolate egress. `Some(vec![])`: deny all egress.
    pub egress: Option<Vec<Rule>>,
    /// Same for ingress.
    pub ingress: Option<Vec<Rule>>,
    /// Notes about accepted input that means something other than it may seem.
    pub warnings: Vec<String>,
}

impl Policy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One rule: any of `peers` (all destinations when `None`) on any of `ports` (all when `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    IpBlock {
        cidr: IpNet,
        except: Vec<IpNet>,
    },
    /// podSelector and/or namespaceSelector: both set means both must match (AND).
    Pods {
        pods: Option<Selector>,
        namespaces: Option<Selector>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub protocol: u8,
    pub port: PortRef,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    /// No port: every port of the protocol.
    Any,
    Range(u16, u16),
    /// A container port name, resolved per destination pod.
    Named(String),
}

type FieldError = (String, String);

pub fn validate(doc: NetworkPolicyDoc, namespace: String, name: String) -> Result<Policy, FieldError> {
    if doc.api_version != "networking.k8s.io/v1" {
        return Err((
            "apiVersion".into(),
            format!("expected networking.k8s.io/v1, got {:?}", doc.api_version),
        ));
    }
    let spec = doc.spec;
    let pod_selector =
        Selector::parse(&spec.pod_selector).map_err(|(f, m)| (format!("spec.podSelector.{f}"), m))?;
    let mut warnings = Vec::new();
    let (mut has_ingress, mut has_egress) = (false, false);
    match spec.policy_types.as_deref() {
        // Kubernetes defaulting (also for an empty list, as the API server reads
        // `len(policyTypes) == 0`): Ingress always; Egress when egress rules are present,
        // so `egress: []` without policyTypes does not isolate egress.
        None | Some([]) => {
            has_ingress = true;
            has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => has_ingress = true,
                    "Egress" => has_egress = true,
                    other => {
                        return Err((
                            format!("spec.policyTypes[{i}]"),
                            format!("unknown policy type {other:?} (Ingress, Egress)"),
                        ));
                    }
                }
            }
        }
    }
    let mut egress = Vec::new();
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let at = format!("spec.egress[{i}]");
        egress.push(rule_of(
            &at,
            "to",
            rule.to.as_deref(),
            rule.ports.as_deref(),
            &mut warnings,
        )?);
    }
    let mut ingress = Vec::new();
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let at = format!("spec.ingress[{i}]");
        ingress.push(rule_of(
            &at,
            "from",
            rule.from.as_deref(),
            rule.ports.as_deref(),
            &mut warnings,
        )?);
    }
    Ok(Policy {
        namespace,
        name,
        pod_selector,
        egress: has_egress.then_some(egress),
        ingress: has_ingress.then_some(ingress),
        warnings,
    })
}

fn rule_of(
    at: &str,
    peers_field: &str,
    peers: Option<&[PeerDoc]>,
    ports: Option<&[PortDoc]>,
    warnings: &mut Vec<String>,
) -> Result<Rule, FieldError> {
    // An empty list means the same as an absent one: no restriction on that axis.
    let peers = match peers {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(j, p)| peer(&format!("{at}.{peers_field}[{j}]"), p, warnings))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let ports = match ports {
        None | Some([]) => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(j, p)| port(&format!("{at}.ports[{j}]"), p))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(Rule { peers, ports })
}

fn peer(at: &str, doc: &PeerDoc, warnings: &mut Vec<String>) -> Result<Peer, FieldError> {
    match (&doc.ip_block, &doc.pod_selector, &doc.namespace_selector) {
        (Some(block), None, None) => {
            let cidr = cidr(&format!("{at}.ipBlock.cidr"), &block.cidr, warnings)?;
            let mut except = Vec::new();
            for (k, e) in block.except.iter().flatten().enumerate() {
                let field = format!("{at}.ipBlock.except[{k}]");
                let hole = self::cidr(&field, e, warnings)?;
                let inside = hole.prefix_len() > cidr.prefix_len() && cidr.contains(&hole);
                if !inside {
                    return Err((field, format!("{e:?} is not strictly inside cidr {cidr}")));
                }
                except.push(hole);
            }
            Ok(Peer::IpBlock { cidr, except })
        }
        (Some(_), _, _) => Err((
            format!("{at}.ipBlock"),
            "ipBlock cannot be combined with podSelector or namespaceSelector in one peer".into(),
        )),
        (None, None, None) => Err((
            at.into(),
            "a peer needs podSelector, namespaceSelector or ipBlock".into(),
        )),
        (None, pods, namespaces) => Ok(Peer::Pods {
            pods: pods
                .as_deref()
                .map(Selector::parse)
                .transpose()
                .map_err(|(f, m)| (format!("{at}.podSelector.{f}"), m))?,
            namespaces: namespaces
                .as_deref()
                .map(Selector::parse)
                .transpose()
                .map_err(|(f, m)| (format!("{at}.namespaceSelector.{f}"), m))?,
        }),
    }
}

/// Host bits set (`10.0.0.1/8`) are accepted and cleared, with a warning: the API server
/// accepts such CIDRs (it parses them sloppily and only warns), and CNIs enforce the
/// network, so refusing them would reject policies that are live in clusters. A prefix
/// inside ::ffff:0:0/96 becomes the IPv4 prefix it maps, because the kernel judges
/// IPv4-mapped destinations as IPv4 (so `::ffff:0:0/96` means 0.0.0.0/0).
fn cidr(field: &str, text: &str, warnings: &mut Vec<String>) -> Result<IpNet, FieldError> {
    let net: IpNet = text
        .parse()
        .map_err(|e| (field.to_string(), format!("invalid CIDR {text:?}: {e}")))?;
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
    {
        let mapped = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
            .expect("prefix ≤ 32")
            .trunc();
        warnings.push(format!(
            "{field}: {text} is IPv4-mapped IPv6; enforced as {mapped}"
        ));
        return Ok(IpNet::V4(mapped));
    }
    if net.trunc() != net {
        warnings.push(format!(
            "{field}: {text} has host bits set; enforced as {}",
            net.trunc()
        ));
    }
    Ok(net.trunc())
}

pub(super) fn port(at: &str, doc: &PortDoc) -> Result<PortSpec, FieldError> {
    let text = doc.protocol.as_deref().unwrap_or("TCP");
    let protocol = protocol_number(text).ok_or_else(|| {
        (
            format!("{at}.protocol"),
            format!("unknown protocol {text:?} (TCP, UDP, SCTP)"),
        )
    })?;
    let port = match (&doc.port, doc.end_port) {
        (None, None) => PortRef::Any,
        (None, Some(_)) => return Err((format!("{at}.endPort"), "endPort requires port".into())),
        (Some(IntOrString::String(name)), Some(_)) => {
            return Err((
                format!("{at}.endPort"),
                format!("endPort cannot be used with named port {name:?}"),
            ));
        }
        (Some(IntOrString::String(name)), None) => {
            if !is_port_name(name) {
                return Err((
                    format!("{at}.port"),
                    format!("{name:?} is not a valid port name (1-15 lowercase letters, digits and '-')"),
                ));
            }
            PortRef::Named(name.clone())
        }
        (Some(IntOrString::Int(n)), end) => {
            let start = port_number(&format!("{at}.port"), *n)?;
            let end = match end {
                None => start,
                Some(e) => {
                    let end = port_number(&format!("{at}.endPort"), e)?;
                    if end < start {
                        return Err((
                            format!("{at}.endPort"),
                            format!("endPort {end} is less than port {start}"),
                        ));
                    }
                    end
                }
            };
            PortRef::Range(start, end)
        }
    };
    Ok(PortSpec { protocol, port })
}

fn port_number(field: &str, n: i64) -> Result<u16, FieldError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| (field.to_string(), format!("port {n} is outside 1-65535")))
}

/// IANA service name rules, as Kubernetes validates container port names.
pub fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}
