//! A test HTTP server that speaks the Kubernetes list/watch protocol, for the real kube
//! client: paginated lists with resourceVersion, chunked watch streams of JSON events,
//! bookmarks, 410 Gone for an expired resourceVersion, and dropped watches. Loopback only.
//!
//! Served: `/api/v1/pods`, `/api/v1/namespaces`, `/apis/networking.k8s.io/v1/networkpolicies`,
//! and once [`KubeApiServer::install_crds`] is called `/apis/pipeguard.dev/v1alpha1/`
//! `domainpolicies` and `clusterdomainpolicies` (404 before, as on a cluster without the
//! CRDs) (cluster-wide list and watch), and POST/PATCH of core events. With the CRDs, also
//! `workloadbaselines`: list (cluster-wide and per namespace, paginated), get, create
//! (409 when it exists), JSON merge patch (404 when it does not) and replace (409 on a stale
//! resourceVersion), as the API server answers them. Label and field selectors are not
//! evaluated (the agent asks for neither).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::{broadcast, mpsc},
};

type Key = (String, String, String); // kind, namespace, name

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// (resourceVersion, kind, event JSON line) since the history floor.
    history: Vec<(u64, String, String)>,
    /// A watch from a resourceVersion below this gets 410 Gone.
    floor: u64,
    watchers: Vec<(String, mpsc::UnboundedSender<String>)>,
    requests: Vec<String>,
    events: Vec<Value>,
    /// The domain policy CRDs are installed (their paths answer instead of 404).
    crds: bool,
    /// Kinds whose list and watch requests answer 500 (an API server that lost etcd).
    failing: std::collections::BTreeSet<String>,
    /// Kind → when its first complete list (last page) was written to a client.
    lists_served: BTreeMap<String, std::time::Instant>,
}

const CRD_KINDS: [&str; 2] = ["DomainPolicy", "ClusterDomainPolicy"];

pub struct KubeApiServer {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
    drop_tx: broadcast::Sender<()>,
}

fn kind_of_path(path: &str) -> Option<&'static str> {
    match path {
        "/api/v1/pods" => Some("Pod"),
        "/api/v1/namespaces" => Some("Namespace"),
        "/apis/networking.k8s.io/v1/networkpolicies" => Some("NetworkPolicy"),
        "/apis/pipeguard.dev/v1alpha1/domainpolicies" => Some("DomainPolicy"),
        "/apis/pipeguard.dev/v1alpha1/clusterdomainpolicies" => Some("ClusterDomainPolicy"),
        _ => None,
    }
}

fn list_kind(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "Pod" => ("PodList", "v1"),
        "Namespace" => ("NamespaceList", "v1"),
        "DomainPolicy" => ("DomainPolicyList", "pipeguard.dev/v1alpha1"),
        "ClusterDomainPolicy" => ("ClusterDomainPolicyList", "pipeguard.dev/v1alpha1"),
        "WorkloadBaseline" => ("WorkloadBaselineList", "pipeguard.dev/v1alpha1"),
        _ => ("NetworkPolicyList", "networking.k8s.io/v1"),
    }
}

impl KubeApiServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            ..State::default()
        }));
        let (drop_tx, _) = broadcast::channel(16);
        let (s, d) = (state.clone(), drop_tx.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, s.clone(), d.clone()));
            }
        });
        Self { addr, state, drop_tx }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n",
            self.url()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Creates or replaces an object and tells the watchers.
    pub fn apply(&self, obj: Value) {
        store(&mut self.state.lock().unwrap(), obj);
    }

    /// Every stored object of `kind`.
    pub fn objects(&self, kind: &str) -> Vec<Value> {
        let st = self.state.lock().unwrap();
        st.objects
            .iter()
            .filter(|((k, _, _), _)| k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) {
        let mut st = self.state.lock().unwrap();
        let key = (
            kind.to_string(),
            namespace.unwrap_or_default().to_string(),
            name.to_string(),
        );
        if let Some(mut obj) = st.objects.remove(&key) {
            st.rv += 1;
            obj["metadata"]["resourceVersion"] = st.rv.to_string().into();
            publish(&mut st, kind, "DELETED", obj);
        }
    }

    /// Closes every watch stream abruptly, without the final chunk.
    pub fn drop_watches(&self) {
        let _ = self.drop_tx.send(());
        self.state.lock().unwrap().watchers.clear();
    }

    /// Forgets the event history: resuming a watch from any version seen so far gets 410.
    pub fn expire_history(&self) {
        let mut st = self.state.lock().unwrap();
        st.history.clear();
        st.floor = st.rv + 1;
        st.rv += 1;
    }

    /// From now on the domain policy kinds are served.
    pub fn install_crds(&self) {
        self.state.lock().unwrap().crds = true;
    }

    /// From now on lists and watches of `kind` answer 500, and its open watches are cut.
    pub fn fail(&self, kind: &str) {
        self.state.lock().unwrap().failing.insert(kind.to_string());
        self.drop_watches();
    }

    /// `kind` is served again.
    pub fn heal(&self, kind: &str) {
        self.state.lock().unwrap().failing.remove(kind);
    }

    pub fn request_log(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }

    /// When the last page of the first complete list of `kind` was written to a client.
    pub fn list_served(&self, kind: &str) -> Option<std::time::Instant> {
        self.state.lock().unwrap().lists_served.get(kind).copied()
    }
}

/// Stores `obj` with a new resourceVersion (and a uid when it has none), tells the watchers,
/// and returns it as stored.
fn store(st: &mut State, mut obj: Value) -> Value {
    let kind = obj["kind"].as_str().expect("kind").to_string();
    let ns = obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = obj["metadata"]["name"].as_str().expect("name").to_string();
    st.rv += 1;
    obj["metadata"]["resourceVersion"] = st.rv.to_string().into();
    if obj["metadata"]["uid"].is_null() {
        obj["metadata"]["uid"] = format!("uid-{kind}-{ns}-{name}").to_lowercase().into();
    }
    let key = (kind.clone(), ns, name);
    let kind_of_event = if st.objects.contains_key(&key) {
        "MODIFIED"
    } else {
        "ADDED"
    };
    st.objects.insert(key, obj.clone());
    publish(st, &kind, kind_of_event, obj.clone());
    obj
}

const BASELINE_KIND: &str = "WorkloadBaseline";
const BASELINE_GROUP: &str = "/apis/pipeguard.dev/v1alpha1/";

/// `workloadbaselines` paths: (namespace, name), each when the path has it.
fn baseline_path(path: &str) -> Option<(Option<&str>, Option<&str>)> {
    let rest = path.strip_prefix(BASELINE_GROUP)?;
    if rest == "workloadbaselines" {
        return Some((None, None));
    }
    let rest = rest.strip_prefix("namespaces/")?;
    let (ns, rest) = rest.split_once('/')?;
    match rest.split_once('/') {
        None if rest == "workloadbaselines" => Some((Some(ns), None)),
        Some(("workloadbaselines", name)) if !name.is_empty() && !name.contains('/') => {
            Some((Some(ns), Some(name)))
        }
        _ => None,
    }
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message, "code": code}),
    )
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().unwrap();
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// One request on `workloadbaselines`: (status, body).
fn baseline_request(
    method: &str,
    (ns, name): (Option<&str>, Option<&str>),
    params: &BTreeMap<String, String>,
    body: &[u8],
    state: &Mutex<State>,
) -> (u16, Value) {
    let parsed: Result<Value, _> = serde_json::from_slice(body);
    match (method, ns, name) {
        ("GET", _, None) => (200, list(BASELINE_KIND, ns, params, state)),
        ("GET", Some(ns), Some(name)) => {
            let st = state.lock().unwrap();
            match st.objects.get(&(BASELINE_KIND.into(), ns.into(), name.into())) {
                Some(obj) => (200, obj.clone()),
                None => status(404, "NotFound", format!("workloadbaselines {name:?} not found")),
            }
        }
        ("POST", Some(ns), None) => {
            let Ok(mut obj) = parsed else {
                return status(400, "BadRequest", "body is not JSON".into());
            };
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                return status(422, "Invalid", "metadata.name: Required value".into());
            };
            let mut st = state.lock().unwrap();
            if st
                .objects
                .contains_key(&(BASELINE_KIND.into(), ns.into(), name.clone()))
            {
                return status(
                    409,
                    "AlreadyExists",
                    format!("workloadbaselines {name:?} already exists"),
                );
            }
            obj["metadata"]["namespace"] = ns.into();
            obj["kind"] = BASELINE_KIND.into();
            (201, store(&mut st, obj))
        }
        ("PATCH" | "PUT", Some(ns), Some(name)) => {
            let Ok(patch) = parsed else {
                return status(400, "BadRequest", "body is not JSON".into());
            };
            let mut st = state.lock().unwrap();
            let key = (BASELINE_KIND.to_string(), ns.to_string(), name.to_string());
            let Some(current) = st.objects.get(&key).cloned() else {
                return status(404, "NotFound", format!("workloadbaselines {name:?} not found"));
            };
            let obj = if method == "PUT" {
                // Custom resources allow no unconditional update.
                let given = patch["metadata"]["resourceVersion"].as_str().unwrap_or_default();
                if given
                    != current["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                {
                    return status(409, "Conflict", format!("the object {name:?} has been modified"));
                }
                let mut obj = patch;
                obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
                obj
            } else {
                let mut obj = current;
                merge_patch(&mut obj, &patch);
                obj
            };
            (200, store(&mut st, obj))
        }
        _ => status(405, "MethodNotAllowed", format!("{method} is not supported here")),
    }
}

/// One watch event as the API server writes it: "type" before "object" (serde_json's map
/// would sort them the other way, and a client then has to buffer the whole object before
/// it knows what the event is, so memory figures would be a test artefact).
fn watch_line(event_type: &str, obj: &Value) -> String {
    format!(r#"{{"type":{},"object":{obj}}}"#, Value::from(event_type))
}

fn publish(st: &mut State, kind: &str, event_type: &str, obj: Value) {
    let line = watch_line(event_type, &obj);
    let rv = st.rv;
    st.history.push((rv, kind.to_string(), line.clone()));
    st.watchers
        .retain(|(k, tx)| k != kind || tx.send(line.clone()).is_ok());
}

fn query(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let params = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (path.to_string(), params)
}

async fn serve(stream: TcpStream, state: Arc<Mutex<State>>, drop_tx: broadcast::Sender<()>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; content_length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        );
        state.lock().unwrap().requests.push(format!("{method} {target}"));
        let (path, params) = query(&target);
        if method != "GET" && path.starts_with("/api/v1/namespaces/") && path.contains("/events") {
            let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            state.lock().unwrap().events.push(event.clone());
            if respond(
                &mut write,
                if method == "POST" { 201 } else { 200 },
                &event.to_string(),
            )
            .await
            .is_err()
            {
                return;
            }
            continue;
        }
        if let Some(target) = baseline_path(&path).filter(|_| state.lock().unwrap().crds) {
            let (code, answer) = baseline_request(&method, target, &params, &body, &state);
            if respond(&mut write, code, &answer.to_string()).await.is_err() {
                return;
            }
            continue;
        }
        let served = kind_of_path(&path).filter(|k| !CRD_KINDS.contains(k) || state.lock().unwrap().crds);
        let Some(kind) = served else {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
            if respond(&mut write, 404, &status.to_string()).await.is_err() {
                return;
            }
            continue;
        };
        if state.lock().unwrap().failing.contains(kind) {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500});
            if respond(&mut write, 500, &status.to_string()).await.is_err() {
                return;
            }
            continue;
        }
        if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
            // A watch holds the connection to its end. Subscribed now, not at accept: a
            // pooled connection must not carry a drop sent before its watch began.
            watch(write, kind, &params, state, drop_tx.subscribe()).await;
            return;
        }
        let list = list(kind, None, &params, &state);
        if respond(&mut write, 200, &list.to_string()).await.is_err() {
            return;
        }
        if list["metadata"].get("continue").is_none() {
            let mut st = state.lock().unwrap();
            st.lists_served
                .entry(kind.to_string())
                .or_insert_with(std::time::Instant::now);
        }
    }
}

/// A page of `kind`'s objects, of one namespace or all.
fn list(
    kind: &str,
    namespace: Option<&str>,
    params: &BTreeMap<String, String>,
    state: &Mutex<State>,
) -> Value {
    let st = state.lock().unwrap();
    // Only the page is copied: a 50,000-pod list in pages of 500 stays linear.
    let items: Vec<&Value> = st
        .objects
        .iter()
        .filter(|((k, ns, _), _)| k == kind && namespace.is_none_or(|n| n == ns))
        .map(|(_, v)| v)
        .collect();
    let start: usize = params.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    let limit: usize = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let end = start.saturating_add(limit).min(items.len());
    let page: Vec<Value> = items
        .get(start..end)
        .unwrap_or_default()
        .iter()
        .map(|v| (*v).clone())
        .collect();
    let (list_kind, api_version) = list_kind(kind);
    let mut metadata = json!({"resourceVersion": st.rv.to_string()});
    if end < items.len() {
        metadata["continue"] = end.to_string().into();
    }
    json!({"kind": list_kind, "apiVersion": api_version, "metadata": metadata, "items": page})
}

async fn respond(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    status: u16,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        405 => "Method Not Allowed",
        409 => "Conflict",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        _ => "Not Found",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    write.write_all(head.as_bytes()).await?;
    write.write_all(body.as_bytes()).await
}

async fn chunk(write: &mut tokio::net::tcp::OwnedWriteHalf, line: &str) -> std::io::Result<()> {
    let data = format!("{line}\n");
    write
        .write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
        .await?;
    write.flush().await
}

async fn watch(
    mut write: tokio::net::tcp::OwnedWriteHalf,
    kind: &str,
    params: &BTreeMap<String, String>,
    state: Arc<Mutex<State>>,
    mut drop_rx: broadcast::Receiver<()>,
) {
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = params.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(300u64);
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if write.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let backlog: Result<Vec<String>, ()> = {
        let mut st = state.lock().unwrap();
        if from != 0 && from < st.floor {
            Err(())
        } else {
            st.watchers.push((kind.to_string(), tx));
            Ok(st
                .history
                .iter()
                .filter(|(rv, k, _)| *rv > from && k == kind)
                .map(|(_, _, l)| l.clone())
                .collect())
        }
    };
    let Ok(backlog) = backlog else {
        // What the real server sends for a resourceVersion it no longer has.
        let gone = watch_line(
            "ERROR",
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}),
        );
        let _ = chunk(&mut write, &gone).await;
        let _ = write.write_all(b"0\r\n\r\n").await;
        return;
    };
    for line in backlog {
        if chunk(&mut write, &line).await.is_err() {
            return;
        }
    }
    let deadline = tokio::time::sleep(Duration::from_secs(timeout));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            line = rx.recv() => match line {
                Some(line) => if chunk(&mut write, &line).await.is_err() { return },
                None => return,
            },
            _ = tick.tick(), if bookmarks => {
                let rv = state.lock().unwrap().rv;
                let (_, api_version) = list_kind(kind);
                let bookmark = watch_line("BOOKMARK", &json!({"kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": rv.to_string()}}));
                if chunk(&mut write, &bookmark).await.is_err() { return }
            }
            _ = &mut deadline => {
                let _ = write.write_all(b"0\r\n\r\n").await;
                return;
            }
            // Abrupt: no final chunk, the socket just goes.
            _ = drop_rx.recv() => return,
        }
    }
}
