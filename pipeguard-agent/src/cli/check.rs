//! `pipeguard check`: NetworkPolicy as code. Answers whether one pod can reach another (or
//! an IP, or a name through its domain rules) from policy files and a cluster snapshot,
//! with no cluster and no kernel, or prints the whole pod-to-pod truth table for review as
//! a diff.

use std::{path::PathBuf, process::ExitCode};

use serde::Serialize;

use crate::policy::{self, Cluster, ClusterPod, Destination, PortQuery, Reach};

/// Evaluate NetworkPolicies and domain policies offline: egress of the source, ingress of
/// the destination.
///
/// Exit code: 0 allow, 1 deny, 2 error.
///
/// Example: pipeguard check --policies policies/ --cluster cluster.yaml --from ci/runner --to 10.0.0.5 --port 443
///
/// Example: pipeguard check --policies policies/ --cluster cluster.yaml --from ci/runner --to-name registry.npmjs.org --port 443
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// NetworkPolicy, DomainPolicy or ClusterDomainPolicy YAML file or directory; repeatable.
    #[arg(long = "policies", required = true, value_name = "PATH")]
    pub policies: Vec<PathBuf>,
    /// Cluster snapshot: multi-document YAML of v1 Namespaces and v1 Pods.
    #[arg(long, value_name = "PATH")]
    pub cluster: PathBuf,
    /// Source pod, NAMESPACE/POD.
    #[arg(long, required_unless_present = "matrix")]
    pub from: Option<String>,
    /// Destination: NAMESPACE/POD, or an IP address.
    #[arg(long, required_unless_present_any = ["matrix", "to_name"], conflicts_with = "to_name")]
    pub to: Option<String>,
    /// Destination: a DNS name, allowed (or not) by the source's domain rules.
    #[arg(long, value_name = "NAME")]
    pub to_name: Option<String>,
    /// Names under this domain are always resolvable (the agent's --cluster-domain).
    #[arg(long, default_value = crate::engine::DEFAULT_CLUSTER_DOMAIN, value_name = "DOMAIN", value_parser = super::dns_flags::parse_cluster_domain)]
    pub cluster_domain: String,
    /// Destination port: a number, or a container port name of the destination pod.
    #[arg(long, required_unless_present = "matrix")]
    pub port: Option<String>,
    /// TCP, UDP or SCTP.
    #[arg(long, default_value = "TCP", value_parser = parse_protocol)]
    pub protocol: u8,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print the pod-to-pod reachability table for --port (default 80) instead.
    #[arg(long, conflicts_with_all = ["from", "to", "to_name"])]
    pub matrix: bool,
}

fn parse_protocol(s: &str) -> Result<u8, String> {
    policy::protocol_number(s).ok_or_else(|| format!("unknown protocol {s:?}: use TCP, UDP or SCTP"))
}

const EXIT_ALLOW: u8 = 0;
const EXIT_DENY: u8 = 1;
const EXIT_ERROR: u8 = 2;

pub fn run(args: CheckArgs) -> ExitCode {
    match check(&args) {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("pipeguard check: {message}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn check(args: &CheckArgs) -> Result<u8, String> {
    let set = policy::load_policies(&args.policies);
    if !set.errors.is_empty() {
        let lines: Vec<String> = set.errors.iter().map(|e| format!("  {e}")).collect();
        return Err(format!("invalid policy:\n{}", lines.join("\n")));
    }
    // Accepted input that is enforced differently from how it reads (host bits, IPv4-mapped
    // blocks) is worth a line, but it is not an error.
    for warning in set.warnings() {
        eprintln!("pipeguard check: warning: {warning}");
    }
    let cluster =
        policy::load_cluster(&args.cluster).map_err(|e| format!("invalid cluster snapshot: {e}"))?;
    if args.matrix {
        let port = match args.port.as_deref() {
            None => 80,
            Some(p) => p
                .parse()
                .map_err(|_| format!("--matrix needs a numeric --port, got {p:?}"))?,
        };
        print!("{}", matrix(&set, &cluster, port, args.protocol)?);
        return Ok(EXIT_ALLOW);
    }
    let (from, port) = (
        args.from.as_deref().expect("clap requires it"),
        args.port.as_deref().expect("clap requires it"),
    );
    let source = find_pod(&cluster, from)?;
    if let Some(name) = &args.to_name {
        let port = port
            .parse()
            .map_err(|_| format!("--to-name needs a numeric --port, got {port:?}"))?;
        let answer = policy::reach_name(
            &set,
            &cluster,
            source,
            name,
            port,
            args.protocol,
            &args.cluster_domain,
        )?;
        print_answer(&answer.reach, answer.rule.as_deref(), args.json)?;
        return Ok(if answer.reach.allowed {
            EXIT_ALLOW
        } else {
            EXIT_DENY
        });
    }
    let to = args.to.as_deref().expect("clap requires it");
    let destination = match to.parse() {
        Ok(ip) => match cluster.pods.iter().find(|p| p.ips.contains(&ip)) {
            Some(pod) => Destination::Pod(pod),
            None => Destination::Ip(ip),
        },
        Err(_) => Destination::Pod(find_pod(&cluster, to)?),
    };
    let port = match port.parse() {
        Ok(n) => PortQuery::Number(n),
        Err(_) => PortQuery::Name(port.to_string()),
    };
    let answer = policy::reach(&set, &cluster, source, &destination, &port, args.protocol)
        .map_err(|e| e.to_string())?;
    print_answer(&answer, None, args.json)?;
    Ok(if answer.allowed { EXIT_ALLOW } else { EXIT_DENY })
}

fn print_answer(answer: &Reach, rule: Option<&str>, json: bool) -> Result<(), String> {
    if json {
        let mut out = Json::from(answer);
        out.rule = rule;
        println!("{}", serde_json::to_string(&out).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!("egress:  {}", answer.egress.as_str());
    println!("ingress: {}", answer.ingress.as_str());
    println!("verdict: {}", if answer.allowed { "allow" } else { "deny" });
    if !answer.policies.is_empty() {
        println!("policies: {}", answer.policies.join(", "));
    }
    if let Some(rule) = rule {
        println!("rule: {rule}");
    }
    println!("reason: {}", answer.reason);
    Ok(())
}

fn find_pod<'a>(cluster: &'a Cluster, name: &str) -> Result<&'a ClusterPod, String> {
    let (ns, pod) = name
        .split_once('/')
        .ok_or_else(|| format!("{name:?}: expected NAMESPACE/POD"))?;
    cluster
        .pods
        .iter()
        .find(|p| p.namespace == ns && p.name == pod)
        .ok_or_else(|| format!("pod {name} is not in the cluster snapshot"))
}

/// The field names are a stable interface.
#[derive(Serialize)]
struct Json<'a> {
    verdict: &'static str,
    egress: &'static str,
    ingress: &'static str,
    policies: &'a [String],
    reason: &'a str,
    /// With --to-name: the domain rule that allows the name.
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
}

impl<'a> From<&'a Reach> for Json<'a> {
    fn from(r: &'a Reach) -> Self {
        Self {
            verdict: if r.allowed { "allow" } else { "deny" },
            egress: r.egress.as_str(),
            ingress: r.ingress.as_str(),
            policies: &r.policies,
            reason: &r.reason,
            rule: None,
        }
    }
}

/// Rows are sources, columns destinations, `.` reachable and `X` not, tab-separated, in
/// namespace/pod order: the layout of the upstream e2e truth tables.
pub fn matrix(set: &policy::PolicySet, cluster: &Cluster, port: u16, protocol: u8) -> Result<String, String> {
    let mut pods: Vec<&ClusterPod> = cluster.pods.iter().collect();
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let name = |p: &ClusterPod| format!("{}/{}", p.namespace, p.name);
    let mut out = String::from("-");
    for to in &pods {
        out.push('\t');
        out.push_str(&name(to));
    }
    out.push('\n');
    for from in &pods {
        out.push_str(&name(from));
        for to in &pods {
            let r = policy::reach(
                set,
                cluster,
                from,
                &Destination::Pod(to),
                &PortQuery::Number(port),
                protocol,
            )
            .map_err(|e| e.to_string())?;
            out.push('\t');
            out.push(if r.allowed { '.' } else { 'X' });
        }
        out.push('\n');
    }
    Ok(out)
}
