//! Kubernetes Events whose repeats are counted only when they say the same thing.
//!
//! kube-runtime's `Recorder` folds every event with the same reason and action into the first
//! one's series and keeps that first note, so a later `MembersUnsupported` naming other claims
//! would show in `kubectl describe` with the old claims' names. client-go's events/v1 recorder
//! keys repeats on the note too (kubernetes/kubernetes#112365); this one does the same.

use std::collections::HashMap;
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Api, Client, ResourceExt};
use tokio::sync::Mutex;

/// How long a published event is remembered for counting repeats (kube-runtime's and client-go's).
const REPEAT_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// What makes two events "the same event again".
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RepeatKey {
    warning: bool,
    action: String,
    reason: String,
    note: Option<String>,
    regarding: (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    ),
}

impl RepeatKey {
    fn of(event: &Event, regarding: &ObjectReference) -> Self {
        RepeatKey {
            warning: matches!(event.type_, EventType::Warning),
            action: event.action.clone(),
            reason: event.reason.clone(),
            note: event.note.clone(),
            regarding: (
                regarding.kind.clone(),
                regarding.namespace.clone(),
                regarding.name.clone(),
                regarding.uid.clone(),
            ),
        }
    }
}

/// Publishes events; a repeat of the same event (same reason, action, object and note) within
/// six minutes increments the first one's series instead of creating another.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    recent: Arc<Mutex<HashMap<RepeatKey, K8sEvent>>>,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Recorder {
            client,
            reporter,
            recent: Arc::default(),
        }
    }

    /// Publishes `event` about `regarding` (in its namespace, or `default` for cluster objects).
    pub async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = RepeatKey::of(event, regarding);
        let mut recent = self.recent.lock().await;
        recent.retain(|_, e| last_seen(e).is_some_and(|t| t + REPEAT_WINDOW > now));
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let published = match recent.get(&key) {
            Some(first) => {
                let mut again = first.clone();
                again.series = Some(EventSeries {
                    count: first.series.as_ref().map_or(2, |s| s.count + 1),
                    last_observed_time: MicroTime(now),
                });
                api.patch(
                    &again.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&again),
                )
                .await?
            }
            None => {
                api.create(
                    &PostParams::default(),
                    &self.new_event(event, regarding, now),
                )
                .await?
            }
        };
        recent.insert(key, published);
        Ok(())
    }

    fn new_event(&self, event: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let controller = &self.reporter.controller;
        K8sEvent {
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            type_: Some(
                match event.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(controller),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

fn last_seen(event: &K8sEvent) -> Option<Timestamp> {
    match &event.series {
        Some(series) => Some(series.last_observed_time.0),
        None => event.event_time.as_ref().map(|t| t.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(reason: &str, note: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.into()),
            action: "ResolveMembers".into(),
            secondary: None,
        }
    }

    #[test]
    fn a_repeat_is_the_same_reason_action_object_and_note() {
        let g = ObjectReference {
            kind: Some("ConsistencyGroup".into()),
            namespace: Some("ns".into()),
            name: Some("g".into()),
            uid: Some("u1".into()),
            ..Default::default()
        };
        let other = ObjectReference {
            uid: Some("u2".into()),
            ..g.clone()
        };
        let a = RepeatKey::of(&event("MembersUnsupported", "a (ClaimNotFound)"), &g);
        assert_eq!(
            a,
            RepeatKey::of(&event("MembersUnsupported", "a (ClaimNotFound)"), &g)
        );
        assert_ne!(
            a,
            RepeatKey::of(&event("MembersUnsupported", "b (ClaimNotBound)"), &g),
            "another note is another event"
        );
        assert_ne!(
            a,
            RepeatKey::of(&event("MembersUnsupported", "a (ClaimNotFound)"), &other),
            "a recreated object is another object"
        );
        assert_ne!(a, RepeatKey::of(&event("Other", "a (ClaimNotFound)"), &g));
    }
}
