//! Which volumes a ConsistencyGroup contains: pure decision logic over PVCs and PVs, no I/O.
//!
//! Tenancy is the namespace: a member is always a claim of the group's own namespace, and a
//! volume whose claimRef points elsewhere is never a member, whatever its labels say.

use crate::controller::cache::CachedVolume;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use crate::api::{ConsistencyGroup, ConsistencyGroupSpec, GroupMember, MAX_MEMBERS};

/// The label kubelets set to the node name; local volumes pin themselves to a node with it.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// A member's reason when its claim does not exist.
pub const REASON_CLAIM_NOT_FOUND: &str = "ClaimNotFound";
/// A member's reason when the volume its claim is bound to does not exist.
pub const REASON_VOLUME_NOT_FOUND: &str = "VolumeNotFound";

/// Why a group's members cannot be resolved.
#[derive(Debug, thiserror::Error)]
pub enum SelectorError {
    #[error("spec.{field} is not a valid label selector: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(
        "the group selects {count} claims, more than the {max} a group may have; narrow its selectors or split it"
    )]
    TooManyMembers { count: usize, max: usize },
}

impl SelectorError {
    /// The condition reason the group reports.
    pub fn reason(&self) -> &'static str {
        match self {
            SelectorError::Invalid { .. } => "InvalidSelector",
            SelectorError::TooManyMembers { .. } => "TooManyMembers",
        }
    }
}

/// Node names by their hostname label, from `(node name, hostname label)` pairs. A label value
/// that several Nodes carry is left out (ambiguous).
pub fn nodes_by_hostname<'a>(
    nodes: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> BTreeMap<String, String> {
    let mut by_label: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (name, label) in nodes {
        let Some(label) = label else { continue };
        by_label
            .entry(label.to_string())
            .and_modify(|seen| *seen = None)
            .or_insert_with(|| Some(name.to_string()));
    }
    by_label
        .into_iter()
        .filter_map(|(label, name)| Some((label, name?)))
        .collect()
}

/// Replaces each member's node, the hostname label value its volume is pinned to, with the name
/// of the Node that carries that label (they differ with `--hostname-override`, or FQDN against
/// short names); agents and their tokens know their Node by name. A value no Node carries is
/// kept as it is.
pub fn name_nodes(members: &mut [GroupMember], by_hostname: &BTreeMap<String, String>) {
    for member in members {
        if let Some(name) = member.node.as_ref().and_then(|n| by_hostname.get(n)) {
            member.node = Some(name.clone());
        }
    }
}

/// Resolves the members of a group in `namespace`.
///
/// `claims` may hold claims of any namespace and `volumes` any volume; both are filtered here.
pub fn resolve_members<'a>(
    namespace: &str,
    spec: &ConsistencyGroupSpec,
    claims: impl IntoIterator<Item = &'a PersistentVolumeClaim>,
    volumes: impl IntoIterator<Item = &'a CachedVolume>,
) -> Result<Vec<GroupMember>, SelectorError> {
    let volumes: BTreeMap<&str, &CachedVolume> = volumes
        .into_iter()
        .filter_map(|v| Some((v.metadata.name.as_deref()?, v)))
        .collect();
    resolve_members_with(
        namespace,
        spec,
        claims,
        |name| volumes.get(name).copied(),
        || volumes.values().copied().collect(),
    )
}

/// [`resolve_members`] over a volume lookup by name: what a reconcile costs is then its own
/// members, not every volume of the cluster. `all_volumes` is only called for a `volumeSelector`.
pub fn resolve_members_with<'a, V: Deref<Target = CachedVolume>>(
    namespace: &str,
    spec: &ConsistencyGroupSpec,
    claims: impl IntoIterator<Item = &'a PersistentVolumeClaim>,
    volume: impl Fn(&str) -> Option<V>,
    all_volumes: impl FnOnce() -> Vec<V>,
) -> Result<Vec<GroupMember>, SelectorError> {
    let claims: BTreeMap<&str, &PersistentVolumeClaim> = claims
        .into_iter()
        .filter(|c| c.metadata.namespace.as_deref() == Some(namespace))
        .filter_map(|c| Some((c.metadata.name.as_deref()?, c)))
        .collect();

    let mut names: BTreeSet<String> = spec.claims.iter().flatten().cloned().collect();
    if let Some(selector) = &spec.selector {
        let selector = parse_selector("selector", selector)?;
        names.extend(
            claims
                .iter()
                .filter(|(_, c)| selector.matches(c.labels()))
                .map(|(name, _)| name.to_string()),
        );
    }
    if let Some(selector) = &spec.volume_selector {
        let selector = parse_selector("volumeSelector", selector)?;
        names.extend(
            all_volumes()
                .iter()
                .filter(|v| selector.matches(v.labels()))
                .filter_map(|v| v.spec.as_ref()?.claim_ref.as_ref())
                .filter(|r| r.namespace.as_deref() == Some(namespace))
                .filter_map(|r| r.name.clone()),
        );
    }

    if names.len() > MAX_MEMBERS {
        return Err(SelectorError::TooManyMembers {
            count: names.len(),
            max: MAX_MEMBERS,
        });
    }
    Ok(names
        .into_iter()
        .map(|name| {
            let claim = claims.get(name.as_str()).copied();
            let bound = claim
                .and_then(|c| c.spec.as_ref()?.volume_name.as_deref())
                .and_then(&volume);
            resolve_member(namespace, name, claim, bound.as_deref())
        })
        .collect())
}

/// Whether a change to the claim `name` (with `labels`, bound to a volume with `volume_labels`)
/// can change the members of `group`: the group names it, selects it now, or listed it before
/// (a claim relabelled away must leave). A watch event reconciles only these groups.
pub fn claim_may_affect(
    group: &ConsistencyGroup,
    name: &str,
    labels: &BTreeMap<String, String>,
    volume_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let spec = &group.spec;
    spec.claims.iter().flatten().any(|c| c == name)
        || lists_member(group, |m| m.claim == name)
        || selects(spec.selector.as_ref(), labels)
        || volume_labels.is_some_and(|l| selects(spec.volume_selector.as_ref(), l))
}

/// Whether a change to the volume `name` (with `labels`, claimed by the claim `claim` of the
/// group's namespace, if any) can change the members of `group`. `claim_affects` answers for
/// that claim (see [`claim_may_affect`]).
pub fn volume_may_affect(
    group: &ConsistencyGroup,
    name: &str,
    labels: &BTreeMap<String, String>,
    claim_affects: bool,
) -> bool {
    claim_affects
        || lists_member(group, |m| m.persistent_volume.as_deref() == Some(name))
        || selects(group.spec.volume_selector.as_ref(), labels)
}

fn lists_member(group: &ConsistencyGroup, test: impl Fn(&GroupMember) -> bool) -> bool {
    group
        .status
        .as_ref()
        .is_some_and(|s| s.members.iter().any(test))
}

/// A selector that cannot be parsed selects nothing: its group reports that whatever changes.
fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    selector
        .and_then(|s| Selector::try_from(s.clone()).ok())
        .is_some_and(|s| s.matches(labels))
}

fn parse_selector(
    field: &'static str,
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> Result<Selector, SelectorError> {
    Selector::try_from(selector.clone()).map_err(|e| SelectorError::Invalid { field, reason: e.0 })
}

fn unsupported(mut member: GroupMember, reason: &str, message: String) -> GroupMember {
    member.supported = false;
    member.reason = Some(reason.to_string());
    member.message = Some(message);
    member
}

fn resolve_member(
    namespace: &str,
    name: String,
    claim: Option<&PersistentVolumeClaim>,
    bound: Option<&CachedVolume>,
) -> GroupMember {
    let member = GroupMember {
        claim: name.clone(),
        ..GroupMember::default()
    };
    let Some(claim) = claim else {
        return unsupported(
            member,
            REASON_CLAIM_NOT_FOUND,
            format!("PersistentVolumeClaim {namespace}/{name} does not exist"),
        );
    };
    if claim.metadata.deletion_timestamp.is_some() {
        return unsupported(
            member,
            "ClaimTerminating",
            format!("PersistentVolumeClaim {namespace}/{name} is being deleted"),
        );
    }
    let phase = claim.status.as_ref().and_then(|s| s.phase.as_deref());
    let volume_name = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .filter(|v| !v.is_empty());
    let Some(volume_name) = volume_name.filter(|_| phase == Some("Bound")) else {
        return unsupported(
            member,
            "ClaimNotBound",
            format!(
                "PersistentVolumeClaim {namespace}/{name} is not bound to a volume (phase {})",
                phase.unwrap_or("unknown")
            ),
        );
    };
    let member = GroupMember {
        persistent_volume: Some(volume_name.to_string()),
        ..member
    };
    let Some(volume) = bound else {
        return unsupported(
            member,
            REASON_VOLUME_NOT_FOUND,
            format!("PersistentVolume {volume_name} bound to the claim does not exist"),
        );
    };
    let Some(spec) = volume.spec.as_ref() else {
        return unsupported(
            member,
            REASON_VOLUME_NOT_FOUND,
            format!("PersistentVolume {volume_name} has no spec"),
        );
    };

    // Both sides of the binding must agree: a PVC cannot pull in a volume claimed elsewhere.
    let claim_ref = spec.claim_ref.as_ref();
    let bound_here = claim_ref.is_some_and(|r| {
        r.namespace.as_deref() == Some(namespace)
            && r.name.as_deref() == Some(name.as_str())
            && (r.uid.is_none() || r.uid == claim.metadata.uid)
    });
    if !bound_here {
        let holder = claim_ref
            .map(|r| {
                format!(
                    "{}/{}",
                    r.namespace.as_deref().unwrap_or("?"),
                    r.name.as_deref().unwrap_or("?")
                )
            })
            .unwrap_or_else(|| "no claim".to_string());
        return unsupported(
            member,
            "ClaimedFromOtherNamespace",
            format!(
                "PersistentVolume {volume_name} is bound to {holder}, not to {namespace}/{name}"
            ),
        );
    }

    let member = GroupMember {
        driver: volume_driver(volume),
        capacity: spec
            .capacity
            .as_ref()
            .and_then(|c| c.get("storage"))
            .cloned(),
        volume_mode: Some(
            spec.volume_mode
                .clone()
                .unwrap_or_else(|| "Filesystem".to_string()),
        ),
        ..member
    };
    if member.driver.is_none() {
        return unsupported(
            member,
            "UnsupportedVolumeSource",
            format!(
                "PersistentVolume {volume_name} is neither a CSI, local nor hostPath volume; tandem snapshots node-local block devices only"
            ),
        );
    }
    // A ceph-csi RBD volume is on whichever node maps it (its VolumeAttachment, looked up when a
    // snapshot starts), and is cut centrally by one RBD group snapshot.
    match super::central::rbd_volume(volume) {
        Some(Ok(_)) => {
            return GroupMember {
                supported: true,
                ..member
            };
        }
        Some(Err(e)) => return unsupported(member, "InvalidRbdVolume", e.to_string()),
        None => {}
    }
    match pinned_node(volume) {
        Ok(node) => GroupMember {
            node: Some(node),
            supported: true,
            ..member
        },
        Err(why) => unsupported(
            member,
            "VolumeNotPinnedToNode",
            format!(
                "PersistentVolume {volume_name} {why}; tandem needs the one node that holds it"
            ),
        ),
    }
}

/// The CSI driver name, or the in-tree source tandem understands.
fn volume_driver(volume: &CachedVolume) -> Option<String> {
    let spec = volume.spec.as_ref()?;
    if let Some(csi) = &spec.csi {
        Some(csi.driver.clone())
    } else if spec.local.is_some() {
        Some("local".to_string())
    } else if spec.host_path.is_some() {
        Some("hostPath".to_string())
    } else {
        None
    }
}

/// The single node a volume's required node affinity allows, by the hostname label.
fn pinned_node(volume: &CachedVolume) -> Result<String, &'static str> {
    let terms = volume
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
        .map(|r| r.node_selector_terms.as_slice())
        .unwrap_or_default();
    let [term] = terms else {
        return Err(if terms.is_empty() {
            "has no required node affinity"
        } else {
            "has several node selector terms"
        });
    };
    let nodes: Vec<&String> = term
        .match_expressions
        .iter()
        .flatten()
        .filter(|e| e.key == HOSTNAME_LABEL && e.operator == "In")
        .flat_map(|e| e.values.iter().flatten())
        .collect();
    match nodes.as_slice() {
        [node] => Ok((*node).clone()),
        [] => Err("has no kubernetes.io/hostname node affinity"),
        _ => Err("may be used on several nodes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        LocalVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
        ObjectReference, PersistentVolumeClaimSpec, PersistentVolumeClaimStatus,
        PersistentVolumeSpec, VolumeNodeAffinity,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        LabelSelector, LabelSelectorRequirement, ObjectMeta,
    };

    fn claim(
        ns: &str,
        name: &str,
        labels: &[(&str, &str)],
        volume: Option<&str>,
    ) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                uid: Some(format!("uid-{ns}-{name}")),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                volume_name: volume.map(String::from),
                ..Default::default()
            }),
            status: Some(PersistentVolumeClaimStatus {
                phase: Some(if volume.is_some() { "Bound" } else { "Pending" }.into()),
                ..Default::default()
            }),
        }
    }

    fn volume(
        name: &str,
        claim: (&str, &str),
        node: Option<&str>,
        labels: &[(&str, &str)],
    ) -> CachedVolume {
        k8s_openapi::api::core::v1::PersistentVolume {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                local: Some(LocalVolumeSource {
                    path: format!("/mnt/{name}"),
                    ..Default::default()
                }),
                claim_ref: Some(ObjectReference {
                    namespace: Some(claim.0.into()),
                    name: Some(claim.1.into()),
                    ..Default::default()
                }),
                node_affinity: node.map(|n| VolumeNodeAffinity {
                    required: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_expressions: Some(vec![NodeSelectorRequirement {
                                key: HOSTNAME_LABEL.into(),
                                operator: "In".into(),
                                values: Some(vec![n.into()]),
                            }]),
                            ..Default::default()
                        }],
                    }),
                }),
                ..Default::default()
            }),
            status: None,
        }
        .into()
    }

    fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn selector_picks_claims_of_its_own_namespace_only() {
        let claims = [
            claim("a", "data", &[("app", "db")], Some("pv1")),
            claim("b", "data", &[("app", "db")], Some("pv2")),
            claim("a", "other", &[("app", "web")], Some("pv3")),
        ];
        let volumes = [
            volume("pv1", ("a", "data"), Some("n1"), &[]),
            volume("pv2", ("b", "data"), Some("n2"), &[]),
            volume("pv3", ("a", "other"), Some("n1"), &[]),
        ];
        let spec = ConsistencyGroupSpec {
            selector: Some(labels(&[("app", "db")])),
            ..Default::default()
        };
        let members = resolve_members("a", &spec, &claims, &volumes).unwrap();
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].claim, "data");
        assert_eq!(members[0].persistent_volume.as_deref(), Some("pv1"));
        assert_eq!(members[0].node.as_deref(), Some("n1"));
        assert_eq!(members[0].driver.as_deref(), Some("local"));
        assert!(members[0].supported);
    }

    #[test]
    fn match_expressions_are_honoured() {
        let claims = [
            claim("a", "x", &[("tier", "data")], Some("pv1")),
            claim("a", "y", &[("tier", "wal")], Some("pv2")),
            claim("a", "z", &[("tier", "cache")], Some("pv3")),
        ];
        let volumes = [
            volume("pv1", ("a", "x"), Some("n1"), &[]),
            volume("pv2", ("a", "y"), Some("n1"), &[]),
            volume("pv3", ("a", "z"), Some("n1"), &[]),
        ];
        let spec = ConsistencyGroupSpec {
            selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["data".into(), "wal".into()]),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let names: Vec<_> = resolve_members("a", &spec, &claims, &volumes)
            .unwrap()
            .into_iter()
            .map(|m| m.claim)
            .collect();
        assert_eq!(names, ["x", "y"]);
    }

    #[test]
    fn volume_selector_ignores_volumes_claimed_from_other_namespaces() {
        let claims = [
            claim("a", "mine", &[], Some("pv1")),
            claim("b", "theirs", &[], Some("pv2")),
        ];
        let volumes = [
            volume("pv1", ("a", "mine"), Some("n1"), &[("group", "g")]),
            volume("pv2", ("b", "theirs"), Some("n1"), &[("group", "g")]),
        ];
        let spec = ConsistencyGroupSpec {
            volume_selector: Some(labels(&[("group", "g")])),
            ..Default::default()
        };
        let members = resolve_members("a", &spec, &claims, &volumes).unwrap();
        assert_eq!(
            members.iter().map(|m| m.claim.as_str()).collect::<Vec<_>>(),
            ["mine"]
        );
    }

    #[test]
    fn a_claim_pointing_at_a_volume_bound_elsewhere_is_refused() {
        // A PVC in "a" names pv2, but pv2's claimRef says it belongs to "b".
        let claims = [claim("a", "sneaky", &[], Some("pv2"))];
        let volumes = [volume("pv2", ("b", "theirs"), Some("n1"), &[])];
        let spec = ConsistencyGroupSpec {
            claims: Some(vec!["sneaky".into()]),
            ..Default::default()
        };
        let members = resolve_members("a", &spec, &claims, &volumes).unwrap();
        assert!(!members[0].supported);
        assert_eq!(
            members[0].reason.as_deref(),
            Some("ClaimedFromOtherNamespace")
        );
    }

    #[test]
    fn every_unsupported_member_says_why() {
        let mut nfs = volume("pv-nfs", ("a", "nfs"), Some("n1"), &[]);
        // What the cache keeps of an NFS volume: none of the sources it knows (cache.rs decodes one).
        if let Some(spec) = nfs.spec.as_mut() {
            spec.local = None;
        }
        let claims = [
            claim("a", "unbound", &[], None),
            claim("a", "lost", &[], Some("pv-gone")),
            claim("a", "floating", &[], Some("pv-floating")),
            claim("a", "nfs", &[], Some("pv-nfs")),
        ];
        let volumes = [volume("pv-floating", ("a", "floating"), None, &[]), nfs];
        let spec = ConsistencyGroupSpec {
            claims: Some(
                ["missing", "unbound", "lost", "floating", "nfs"]
                    .map(String::from)
                    .to_vec(),
            ),
            ..Default::default()
        };
        let members = resolve_members("a", &spec, &claims, &volumes).unwrap();
        let reasons: BTreeMap<_, _> = members
            .iter()
            .map(|m| (m.claim.as_str(), m.reason.as_deref().unwrap_or("none")))
            .collect();
        assert_eq!(reasons["missing"], "ClaimNotFound");
        assert_eq!(reasons["unbound"], "ClaimNotBound");
        assert_eq!(reasons["lost"], "VolumeNotFound");
        assert_eq!(reasons["floating"], "VolumeNotPinnedToNode");
        assert_eq!(reasons["nfs"], "UnsupportedVolumeSource");
        assert!(members.iter().all(|m| !m.supported && m.message.is_some()));
    }

    #[test]
    fn more_members_than_a_group_may_have_is_an_error_with_a_reason() {
        let names: Vec<String> = (0..=MAX_MEMBERS).map(|i| format!("c{i}")).collect();
        let claims: Vec<_> = names
            .iter()
            .map(|n| claim("a", n, &[("app", "db")], None))
            .collect();
        let spec = ConsistencyGroupSpec {
            selector: Some(labels(&[("app", "db")])),
            ..Default::default()
        };
        let err = resolve_members("a", &spec, &claims, &[]).expect_err("too many");
        assert_eq!(err.reason(), "TooManyMembers");
        assert!(
            err.to_string().contains(&format!("{}", MAX_MEMBERS + 1)),
            "{err}"
        );
        let fewer = &claims[..MAX_MEMBERS];
        assert_eq!(
            resolve_members("a", &spec, fewer, &[])
                .expect("at the cap")
                .len(),
            MAX_MEMBERS
        );
    }

    #[test]
    fn members_live_on_the_node_whose_hostname_label_their_volume_names() {
        let claims = [claim("a", "data", &[], Some("pv1"))];
        let volumes = [volume("pv1", ("a", "data"), Some("node-a.example"), &[])];
        let spec = ConsistencyGroupSpec {
            claims: Some(vec!["data".into()]),
            ..Default::default()
        };
        let mut members = resolve_members("a", &spec, &claims, &volumes).unwrap();
        let nodes = nodes_by_hostname([
            ("node-a", Some("node-a.example")),
            ("node-b", Some("node-b")),
            ("twin-1", Some("twin")),
            ("twin-2", Some("twin")),
            ("bare", None),
        ]);
        name_nodes(&mut members, &nodes);
        assert_eq!(members[0].node.as_deref(), Some("node-a"));
        // Ambiguous labels are not guessed; a label no Node carries stays as it is.
        assert!(!nodes.contains_key("twin"));
        let mut lonely = vec![GroupMember {
            node: Some("gone".into()),
            ..Default::default()
        }];
        name_nodes(&mut lonely, &nodes);
        assert_eq!(lonely[0].node.as_deref(), Some("gone"));
    }

    #[test]
    fn the_three_ways_combine_without_duplicates() {
        let claims = [
            claim("a", "x", &[("app", "db")], Some("pv1")),
            claim("a", "y", &[], Some("pv2")),
        ];
        let volumes = [
            volume("pv1", ("a", "x"), Some("n1"), &[("g", "1")]),
            volume("pv2", ("a", "y"), Some("n2"), &[]),
        ];
        let spec = ConsistencyGroupSpec {
            selector: Some(labels(&[("app", "db")])),
            volume_selector: Some(labels(&[("g", "1")])),
            claims: Some(vec!["x".into(), "y".into()]),
            ..Default::default()
        };
        let members = resolve_members("a", &spec, &claims, &volumes).unwrap();
        assert_eq!(
            members.iter().map(|m| m.claim.as_str()).collect::<Vec<_>>(),
            ["x", "y"]
        );
    }

    fn group_of(spec: ConsistencyGroupSpec, members: &[(&str, &str)]) -> ConsistencyGroup {
        let mut group = ConsistencyGroup::new("g", spec);
        group.metadata.namespace = Some("a".into());
        group.status = Some(crate::api::ConsistencyGroupStatus {
            members: members
                .iter()
                .map(|(claim, volume)| GroupMember {
                    claim: claim.to_string(),
                    persistent_volume: Some(volume.to_string()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        group
    }

    type Labels = BTreeMap<String, String>;
    /// (group spec, members it lists, claim, claim labels, its volume's labels, affected)
    type ClaimRow<'a> = (
        &'a ConsistencyGroupSpec,
        &'a [(&'a str, &'a str)],
        &'a str,
        &'a Labels,
        Option<&'a Labels>,
        bool,
    );
    /// (members the group lists, volume, volume labels, its claim affects the group, affected)
    type VolumeRow<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a Labels, bool, bool);

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_claim_change_reaches_only_the_groups_it_can_affect() {
        let by_selector = ConsistencyGroupSpec {
            selector: Some(labels(&[("app", "db")])),
            ..Default::default()
        };
        let by_name = ConsistencyGroupSpec {
            claims: Some(vec!["data".into()]),
            ..Default::default()
        };
        let by_volume = ConsistencyGroupSpec {
            volume_selector: Some(labels(&[("tier", "gold")])),
            ..Default::default()
        };
        let broken = ConsistencyGroupSpec {
            selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "app".into(),
                    operator: "Sideways".into(),
                    values: None,
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let db = map(&[("app", "db")]);
        let web = map(&[("app", "web")]);
        let gold = map(&[("tier", "gold")]);
        let table: [ClaimRow; 10] = [
            (&by_selector, &[], "data", &db, None, true),
            (&by_selector, &[], "data", &web, None, false),
            // Relabelled away: it was a member, so the group must drop it.
            (&by_selector, &[("data", "pv1")], "data", &web, None, true),
            (&by_name, &[], "data", &web, None, true),
            (&by_name, &[], "logs", &db, None, false),
            (&by_volume, &[], "data", &web, Some(&gold), true),
            (&by_volume, &[], "data", &web, Some(&web), false),
            (&by_volume, &[], "data", &web, None, false),
            (&broken, &[], "data", &db, None, false),
            (&broken, &[("data", "pv1")], "data", &db, None, true),
        ];
        for (i, (spec, members, name, claim_labels, volume_labels, want)) in
            table.into_iter().enumerate()
        {
            let group = group_of(spec.clone(), members);
            assert_eq!(
                claim_may_affect(&group, name, claim_labels, volume_labels),
                want,
                "row {i}"
            );
        }
    }

    #[test]
    fn a_volume_change_reaches_only_the_groups_it_can_affect() {
        let by_volume = ConsistencyGroupSpec {
            volume_selector: Some(labels(&[("tier", "gold")])),
            ..Default::default()
        };
        let gold = map(&[("tier", "gold")]);
        let plain = map(&[]);
        let table: [VolumeRow; 5] = [
            (&[], "pv1", &gold, false, true),
            (&[], "pv1", &plain, false, false),
            // Relabelled away, or its claim's change matters: the group must look again.
            (&[("data", "pv1")], "pv1", &plain, false, true),
            (&[("data", "pv2")], "pv1", &plain, false, false),
            (&[], "pv1", &plain, true, true),
        ];
        for (i, (members, name, volume_labels, claim_affects, want)) in
            table.into_iter().enumerate()
        {
            let group = group_of(by_volume.clone(), members);
            assert_eq!(
                volume_may_affect(&group, name, volume_labels, claim_affects),
                want,
                "row {i}"
            );
        }
    }
}
