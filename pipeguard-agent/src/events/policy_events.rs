//! A Warning Event on a policy object the agent rejected, so `kubectl describe` on the
//! object says why (and that the pods it would select fail closed).

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};

/// The API server refuses longer Event messages.
const MAX_MESSAGE: usize = 1024;

/// `object` names the rejected object; cluster-scoped objects get their Event in `default`,
/// as kubectl looks for them there.
pub fn post_invalid_policy(client: Client, object: ObjectReference, message: &str, node: &str) {
    let now = Timestamp::now();
    let namespace = object.namespace.clone().unwrap_or_else(|| "default".into());
    let mut message = format!(
        "pipeguard rejected this policy; the guarded pods it could select fail closed: {}",
        crate::escape::printable(message)
    );
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE - 3;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("...");
    }
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.pipeguard.", object.name.clone().unwrap_or_default())),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        },
        involved_object: object,
        reason: Some("PolicyRejected".into()),
        message: Some(message),
        type_: Some("Warning".into()),
        count: Some(1),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        reporting_component: Some("pipeguard".into()),
        reporting_instance: Some(node.to_string()),
        action: Some("Compile".into()),
        source: Some(EventSource {
            component: Some("pipeguard".into()),
            host: Some(node.to_string()),
        }),
        ..Event::default()
    };
    tokio::spawn(async move {
        let api: Api<Event> = Api::namespaced(client, &namespace);
        if let Err(error) = api.create(&PostParams::default(), &event).await {
            tracing::warn!(%error, "posting a Kubernetes Event failed");
        }
    });
}
