//! Problems with a user's policy go back to the user as Kubernetes Events on the object
//! (`kubectl describe authorizationpolicy ...`), with the same messages as `authz-agent validate`.
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    runtime::events::{Event, EventType, Recorder, Reporter},
    Client,
};

use super::snapshot::Report;

#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

/// Events may hold at most 1 kB of message.
const MAX_NOTE: usize = 1000;

impl Events {
    pub fn new(client: Client, node: &str) -> Events {
        let reporter = Reporter {
            controller: "authz-agent".into(),
            instance: Some(format!("authz-agent-{node}")),
        };
        Events {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// One Event per report: Warning `InvalidPolicy` when the object (or this version of it) is
    /// not enforced, Normal `PolicyWarning` when it is, with warnings.
    pub async fn publish(&self, r: &Report) {
        let errors: Vec<&str> = r
            .problems
            .iter()
            .filter(|p| !p.warning)
            .map(|p| p.message.as_str())
            .collect();
        let (type_, reason, note) = if errors.is_empty() {
            let warnings: Vec<&str> = r.problems.iter().map(|p| p.message.as_str()).collect();
            (EventType::Normal, "PolicyWarning", warnings.join("; "))
        } else {
            let effect = if r.kept_previous {
                "this version is not enforced; the previous valid version stays in force"
            } else {
                "not enforced"
            };
            (
                EventType::Warning,
                "InvalidPolicy",
                format!("{}; {effect}", errors.join("; ")),
            )
        };
        let reference = ObjectReference {
            api_version: Some(r.api_version.clone()),
            kind: Some(r.kind.clone()),
            name: Some(r.name.clone()),
            namespace: Some(r.namespace.clone()),
            uid: Some(r.uid.clone()).filter(|u| !u.is_empty()),
            ..Default::default()
        };
        self.post(&reference, type_, reason, note).await;
    }

    /// Warning `InvalidExtensionProvider` on the mesh ConfigMap when its `extensionProviders`
    /// have problems (the CUSTOM policies naming a provider it cannot use deny what they match).
    pub async fn mesh_config(&self, r: &Report) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("ConfigMap".into()),
            name: Some(r.name.clone()),
            namespace: Some(r.namespace.clone()),
            uid: Some(r.uid.clone()).filter(|u| !u.is_empty()),
            ..Default::default()
        };
        let problems: Vec<&str> = r.problems.iter().map(|p| p.message.as_str()).collect();
        let note = format!(
            "{}; CUSTOM policies naming a provider that cannot be used deny the requests they match",
            problems.join("; ")
        );
        self.post(
            &reference,
            EventType::Warning,
            "InvalidExtensionProvider",
            note,
        )
        .await;
    }

    /// Warning `NotEnrolled` on a pod of this node the agent cannot enroll.
    pub async fn pod_not_enrolled(&self, p: &super::snapshot::NotEnrolled) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(p.name.clone()),
            namespace: Some(p.namespace.clone()),
            uid: Some(p.uid.clone()).filter(|u| !u.is_empty()),
            ..Default::default()
        };
        let note = format!(
            "{}; its connections are not steered through the agent yet (retrying)",
            p.reason
        );
        self.post(&reference, EventType::Warning, "NotEnrolled", note)
            .await;
    }

    /// A pod located on this node whose listener or kernel entry failed: its connections to
    /// protected destinations are refused until it is enrolled.
    pub async fn pod_pending(&self, namespace: &str, name: &str, reason: &str) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        };
        let note = format!(
            "{reason}; its connections to protected destinations are refused until the agent enrolls it (retrying)"
        );
        self.post(&reference, EventType::Warning, "NotEnrolled", note)
            .await;
    }

    async fn post(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        mut note: String,
    ) {
        if note.len() > MAX_NOTE {
            let mut cut = MAX_NOTE - 3;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str("...");
        }
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, reference).await {
            tracing::warn!(
                object = %format!("{} {}/{}", reference.kind.as_deref().unwrap_or(""), reference.namespace.as_deref().unwrap_or(""), reference.name.as_deref().unwrap_or("")),
                "cannot post an Event: {e}"
            );
        }
    }
}
