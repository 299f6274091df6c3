//! What the CLI prints: tables, `show` pages and the words for a snapshot's consistency. Pure:
//! objects in, text out; `now` is passed in so ages are testable.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;

use crate::api::{
    CONDITION_READY, Consistency, ConsistencyGroup, FreezePolicy, GroupRestore, GroupSnapshot,
    GroupSnapshotPhase, NodeSnapshot,
};

/// A table as kubectl prints one: upper-case headers, columns three spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count() + 3;
                text.push_str(cell);
                text.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// An age as kubectl prints it: `45s`, `3m12s` under 10 minutes, `25m`, `5h`, `3d`.
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=599 => {
            if s % 60 == 0 {
                format!("{}m", s / 60)
            } else {
                format!("{}m{}s", s / 60, s % 60)
            }
        }
        600..=10799 => format!("{}m", s / 60),
        10800..=172799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn age_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    now: Timestamp,
) -> String {
    meta.creation_timestamp
        .as_ref()
        .map(|t| age(now.as_second() - t.0.as_second()))
        .unwrap_or_else(|| "<unknown>".into())
}

fn or_none<T: ToString>(value: Option<T>) -> String {
    value
        .map(|v| v.to_string())
        .unwrap_or_else(|| "<none>".into())
}

fn debug_word<T: std::fmt::Debug>(value: T) -> String {
    format!("{value:?}")
}

fn ready_condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> String {
    conditions
        .iter()
        .find(|c| c.type_ == CONDITION_READY)
        .map(|c| c.status.clone())
        .unwrap_or_else(|| "<none>".into())
}

fn with_namespace(all: bool, namespace: Option<String>, mut row: Vec<String>) -> Vec<String> {
    if all {
        row.insert(0, namespace.unwrap_or_default());
    }
    row
}

fn headers<'a>(all: bool, base: &[&'a str]) -> Vec<&'a str> {
    let mut h = Vec::new();
    if all {
        h.push("NAMESPACE");
    }
    h.extend_from_slice(base);
    h
}

fn selector_text(
    selector: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> Option<String> {
    let selector = selector.as_ref()?;
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(format!("{} {} ({values})", e.key, e.operator));
    }
    Some(parts.join(","))
}

/// `group list`.
pub fn groups_table(groups: &[ConsistencyGroup], wide: bool, all: bool, now: Timestamp) -> String {
    let mut base = vec![
        "NAME",
        "MEMBERS",
        "UNSUPPORTED",
        "NODES",
        "FREEZE",
        "READY",
        "AGE",
    ];
    if wide {
        base.extend(["TIMEOUT", "SELECTOR", "CLAIMS"]);
    }
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            let status = g.status.clone().unwrap_or_default();
            let mut row = vec![
                g.name_any(),
                status.ready_members.to_string(),
                status.unsupported_members.to_string(),
                status.node_count.to_string(),
                debug_word(g.spec.freeze),
                ready_condition(&status.conditions),
                age_of(&g.metadata, now),
            ];
            if wide {
                row.push(format!("{}s", g.spec.freeze_timeout_seconds));
                row.push(or_none(selector_text(&g.spec.selector)));
                row.push(or_none(g.spec.claims.as_ref().map(|c| c.join(","))));
            }
            with_namespace(all, g.namespace(), row)
        })
        .collect();
    table(&headers(all, &base), &rows)
}

/// `snapshot list`.
pub fn snapshots_table(
    snapshots: &[GroupSnapshot],
    wide: bool,
    all: bool,
    now: Timestamp,
) -> String {
    let mut base = vec![
        "NAME",
        "GROUP",
        "PHASE",
        "CONSISTENCY",
        "MEMBERS",
        "FREEZE-MS",
        "AGE",
    ];
    if wide {
        base.extend(["NODES", "POLICY", "MESSAGE"]);
    }
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            let status = s.status.clone().unwrap_or_default();
            let mut row = vec![
                s.name_any(),
                s.spec.group_name.clone(),
                debug_word(status.phase),
                or_none(status.consistency.map(debug_word)),
                status.member_count.to_string(),
                or_none(status.freeze_window_millis),
                age_of(&s.metadata, now),
            ];
            if wide {
                row.push(status.nodes.len().to_string());
                row.push(debug_word(s.spec.deletion_policy));
                row.push(status.message.clone().unwrap_or_default());
            }
            with_namespace(all, s.namespace(), row)
        })
        .collect();
    table(&headers(all, &base), &rows)
}

/// `restore list`.
pub fn restores_table(restores: &[GroupRestore], wide: bool, all: bool, now: Timestamp) -> String {
    let mut base = vec![
        "NAME",
        "SNAPSHOT",
        "MODE",
        "PHASE",
        "CONSISTENCY",
        "MEMBERS",
        "AGE",
    ];
    if wide {
        base.push("MESSAGE");
    }
    let rows: Vec<Vec<String>> = restores
        .iter()
        .map(|r| {
            let status = r.status.clone().unwrap_or_default();
            let mut row = vec![
                r.name_any(),
                r.spec.source.group_snapshot_name.clone(),
                debug_word(r.spec.mode),
                debug_word(status.phase),
                or_none(status.consistency.map(debug_word)),
                status.member_count.to_string(),
                age_of(&r.metadata, now),
            ];
            if wide {
                row.push(status.message.clone().unwrap_or_default());
            }
            with_namespace(all, r.namespace(), row)
        })
        .collect();
    table(&headers(all, &base), &rows)
}

/// The consistency a snapshot reached, and why, in words.
pub fn consistency_why(snapshot: &GroupSnapshot, freeze: Option<FreezePolicy>) -> String {
    let Some(status) = &snapshot.status else {
        return "not reached yet (no status)".into();
    };
    match (status.phase, status.consistency) {
        (_, Some(Consistency::ApplicationQuiesced)) => format!(
            "ApplicationQuiesced: every quiesce hook succeeded ({} run(s)) and all {} members were frozen before any was thawed, so a restore needs no crash recovery",
            status.hooks.len(),
            status.members.len()
        ),
        (_, Some(Consistency::FilesystemFrozen)) if !status.failed_hooks.is_empty() => format!(
            "FilesystemFrozen: all {} members were frozen before any was thawed (crash-consistent), but hook(s) {} failed, so the applications were not quiesced",
            status.members.len(),
            status.failed_hooks.join(", ")
        ),
        (_, Some(Consistency::FilesystemFrozen)) => format!(
            "FilesystemFrozen: all {} members were frozen before any was thawed, so the set is crash-consistent (one point in time)",
            status.members.len()
        ),
        (_, Some(Consistency::Independent)) => {
            let unfrozen: Vec<String> = status
                .members
                .iter()
                .filter(|m| !m.frozen)
                .map(|m| match &m.message {
                    Some(why) => format!("{} ({why})", m.claim),
                    None => m.claim.clone(),
                })
                .collect();
            let cause = match freeze {
                Some(FreezePolicy::Disabled) => "the group's freeze policy is Disabled".to_string(),
                _ if unfrozen.is_empty() => "not every member was frozen".to_string(),
                _ => format!("not frozen: {}", unfrozen.join(", ")),
            };
            format!(
                "Independent: each member snapshot is consistent on its own, not as a set; {cause}"
            )
        }
        (GroupSnapshotPhase::Failed, None) => format!(
            "none: the snapshot failed{}",
            status
                .message
                .as_ref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ),
        (phase, None) => format!("not reached yet (phase {phase:?})"),
    }
}

fn time_text(t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    t.as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_else(|| "<none>".into())
}

/// `snapshot show`: what `kubectl describe` would, plus the member table, the freeze window per
/// node and the consistency with its reason.
pub fn snapshot_page(
    snapshot: &GroupSnapshot,
    node_snapshots: &[NodeSnapshot],
    freeze: Option<FreezePolicy>,
) -> String {
    let status = snapshot.status.clone().unwrap_or_default();
    let mut out = String::new();
    let field = |out: &mut String, k: &str, v: String| {
        let _ = writeln!(out, "{:<18}{v}", format!("{k}:"));
    };
    field(&mut out, "Name", snapshot.name_any());
    field(
        &mut out,
        "Namespace",
        snapshot.namespace().unwrap_or_default(),
    );
    field(&mut out, "Group", snapshot.spec.group_name.clone());
    field(
        &mut out,
        "Deletion policy",
        debug_word(snapshot.spec.deletion_policy),
    );
    field(&mut out, "Phase", debug_word(status.phase));
    field(&mut out, "Consistency", consistency_why(snapshot, freeze));
    field(
        &mut out,
        "Freeze window",
        status
            .freeze_window_millis
            .map(|ms| format!("{ms} ms (first freeze on any node to last thaw)"))
            .unwrap_or_else(|| "<none>".into()),
    );
    field(&mut out, "Started", time_text(&status.start_time));
    field(&mut out, "Completed", time_text(&status.completion_time));
    if let Some(message) = &status.message {
        field(&mut out, "Message", message.clone());
    }
    if let Some(ready) = status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_READY)
    {
        field(
            &mut out,
            "Ready",
            format!("{} ({}): {}", ready.status, ready.reason, ready.message),
        );
    }

    out.push_str("\nNodes:\n");
    let mut nodes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for window in &status.nodes {
        nodes.insert(
            window.node.clone(),
            vec![
                or_none(window.freeze_window_millis),
                String::new(),
                String::new(),
            ],
        );
    }
    for ns in node_snapshots {
        let entry = nodes
            .entry(ns.spec.node_name.clone())
            .or_insert_with(|| vec!["<none>".into(), String::new(), String::new()]);
        let st = ns.status.clone().unwrap_or_default();
        if entry[0] == "<none>"
            && let Some(ms) = st.freeze_window_millis
        {
            entry[0] = ms.to_string();
        }
        entry[1] = format!("{:?}/{:?}", ns.spec.action, st.phase);
        entry[2] = st.message.unwrap_or_default();
    }
    let members_per_node = |node: &str| status.members.iter().filter(|m| m.node == node).count();
    let rows: Vec<Vec<String>> = nodes
        .into_iter()
        .map(|(node, cells)| {
            let count = members_per_node(&node).to_string();
            vec![
                node,
                count,
                cells[0].clone(),
                or_blank(&cells[1]),
                cells[2].clone(),
            ]
        })
        .collect();
    out.push_str(&indent(&table(
        &["NODE", "MEMBERS", "FREEZE-MS", "ACTION/PHASE", "MESSAGE"],
        &rows,
    )));

    out.push_str("\nMembers:\n");
    let rows: Vec<Vec<String>> = status
        .members
        .iter()
        .map(|m| {
            vec![
                m.claim.clone(),
                m.persistent_volume.clone(),
                m.node.clone(),
                or_none(m.backend.clone()),
                or_none(m.filesystem.clone()),
                if m.frozen { "yes".into() } else { "no".into() },
                or_none(m.size.as_ref().map(|q| q.0.clone())),
                or_none(m.cut_time.as_ref().map(|t| t.0.to_string())),
                m.message.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&indent(&table(
        &[
            "CLAIM", "VOLUME", "NODE", "BACKEND", "FS", "FROZEN", "SIZE", "CUT", "MESSAGE",
        ],
        &rows,
    )));

    if !status.hooks.is_empty() {
        let _ = writeln!(
            out,
            "\nQuiesce hooks (window {}):",
            status
                .quiesce_window_millis
                .map(|ms| format!("{ms} ms, first hold ready to last release"))
                .unwrap_or_else(|| "<none>".into())
        );
        let rows: Vec<Vec<String>> = status
            .hooks
            .iter()
            .map(|h| {
                vec![
                    h.name.clone(),
                    debug_word(h.mode),
                    h.phase.map(debug_word).unwrap_or_else(|| "<none>".into()),
                    or_none(h.pod.clone()),
                    or_none(h.container.clone()),
                    debug_word(h.state),
                    or_none(h.exit_code),
                    h.message.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&indent(&table(
            &[
                "HOOK",
                "MODE",
                "PHASE",
                "POD",
                "CONTAINER",
                "STATE",
                "EXIT",
                "MESSAGE",
            ],
            &rows,
        )));
    }
    out
}

fn or_blank(s: &str) -> String {
    if s.is_empty() {
        "<none>".into()
    } else {
        s.into()
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// `group show`.
pub fn group_page(group: &ConsistencyGroup, snapshots: &[GroupSnapshot], now: Timestamp) -> String {
    let status = group.status.clone().unwrap_or_default();
    let mut out = String::new();
    let field = |out: &mut String, k: &str, v: String| {
        let _ = writeln!(out, "{:<18}{v}", format!("{k}:"));
    };
    field(&mut out, "Name", group.name_any());
    field(&mut out, "Namespace", group.namespace().unwrap_or_default());
    field(
        &mut out,
        "Selector",
        or_none(selector_text(&group.spec.selector)),
    );
    field(
        &mut out,
        "Volume selector",
        or_none(selector_text(&group.spec.volume_selector)),
    );
    field(
        &mut out,
        "Claims",
        or_none(group.spec.claims.as_ref().map(|c| c.join(", "))),
    );
    field(&mut out, "Freeze", debug_word(group.spec.freeze));
    field(
        &mut out,
        "Freeze timeout",
        format!("{}s", group.spec.freeze_timeout_seconds),
    );
    field(
        &mut out,
        "Members",
        format!(
            "{} can be snapshotted, {} cannot, on {} node(s)",
            status.ready_members, status.unsupported_members, status.node_count
        ),
    );
    if let Some(ready) = status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_READY)
    {
        field(
            &mut out,
            "Ready",
            format!("{} ({}): {}", ready.status, ready.reason, ready.message),
        );
    }
    out.push_str("\nMembers:\n");
    let rows: Vec<Vec<String>> = status
        .members
        .iter()
        .map(|m| {
            vec![
                m.claim.clone(),
                or_none(m.persistent_volume.clone()),
                or_none(m.node.clone()),
                or_none(m.driver.clone()),
                or_none(m.capacity.as_ref().map(|q| q.0.clone())),
                or_none(m.volume_mode.clone()),
                if m.supported {
                    "yes".into()
                } else {
                    "no".into()
                },
                match (&m.reason, &m.message) {
                    (Some(r), Some(msg)) => format!("{r}: {msg}"),
                    (Some(r), None) => r.clone(),
                    _ => String::new(),
                },
            ]
        })
        .collect();
    out.push_str(&indent(&table(
        &[
            "CLAIM",
            "VOLUME",
            "NODE",
            "DRIVER",
            "CAPACITY",
            "MODE",
            "SUPPORTED",
            "REASON",
        ],
        &rows,
    )));
    out.push_str("\nSnapshots:\n");
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            let st = s.status.clone().unwrap_or_default();
            vec![
                s.name_any(),
                debug_word(st.phase),
                or_none(st.consistency.map(debug_word)),
                or_none(st.freeze_window_millis),
                age_of(&s.metadata, now),
            ]
        })
        .collect();
    out.push_str(&indent(&table(
        &["NAME", "PHASE", "CONSISTENCY", "FREEZE-MS", "AGE"],
        &rows,
    )));
    out
}

/// `restore show`.
pub fn restore_page(restore: &GroupRestore) -> String {
    let status = restore.status.clone().unwrap_or_default();
    let mut out = String::new();
    let field = |out: &mut String, k: &str, v: String| {
        let _ = writeln!(out, "{:<18}{v}", format!("{k}:"));
    };
    field(&mut out, "Name", restore.name_any());
    field(
        &mut out,
        "Namespace",
        restore.namespace().unwrap_or_default(),
    );
    field(
        &mut out,
        "Snapshot",
        restore.spec.source.group_snapshot_name.clone(),
    );
    field(&mut out, "Mode", debug_word(restore.spec.mode));
    field(&mut out, "Phase", debug_word(status.phase));
    field(
        &mut out,
        "Consistency",
        or_none(status.consistency.map(debug_word)),
    );
    field(
        &mut out,
        "Deadline",
        format!("{}s", restore.spec.deadline_seconds),
    );
    field(&mut out, "Started", time_text(&status.start_time));
    field(&mut out, "Completed", time_text(&status.completion_time));
    if let Some(message) = &status.message {
        field(&mut out, "Message", message.clone());
    }
    if let Some(ready) = status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_READY)
    {
        field(
            &mut out,
            "Ready",
            format!("{} ({}): {}", ready.status, ready.reason, ready.message),
        );
    }
    out.push_str("\nMembers:\n");
    let rows: Vec<Vec<String>> = status
        .members
        .iter()
        .map(|m| {
            vec![
                m.source_claim.clone(),
                m.claim.clone(),
                m.persistent_volume.clone(),
                m.node.clone(),
                or_none(m.method.map(debug_word)),
                or_none(m.backend.clone()),
                or_none(m.size.as_ref().map(|q| q.0.clone())),
                or_none(m.progress_percent.map(|p| format!("{p}%"))),
                or_none(m.cloned_at.as_ref().map(|t| t.0.to_string())),
                m.message.clone().unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&indent(&table(
        &[
            "FROM", "CLAIM", "VOLUME", "NODE", "METHOD", "BACKEND", "SIZE", "COPIED", "CLONED",
            "MESSAGE",
        ],
        &rows,
    )));
    if !status.workloads.is_empty() {
        out.push_str("\nWorkloads scaled down:\n");
        let rows: Vec<Vec<String>> = status
            .workloads
            .iter()
            .map(|w| {
                vec![
                    w.kind.clone(),
                    w.name.clone(),
                    w.replicas.to_string(),
                    if w.restored {
                        "yes".into()
                    } else {
                        "no".into()
                    },
                ]
            })
            .collect();
        out.push_str(&indent(&table(
            &["KIND", "NAME", "REPLICAS", "SCALED-BACK"],
            &rows,
        )));
    }
    if !status.pre_restore.is_empty() {
        out.push_str("\nUndo point (volumes the claims had before):\n");
        let rows: Vec<Vec<String>> = status
            .pre_restore
            .iter()
            .map(|p| vec![p.claim.clone(), p.persistent_volume.clone()])
            .collect();
        out.push_str(&indent(&table(&["CLAIM", "VOLUME"], &rows)));
    }
    out
}

/// One row of `nodes`: what is known about a node from what tandem's objects record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    pub kernel: Option<String>,
    pub ready: Option<String>,
    pub agent_seen: Option<Timestamp>,
    pub backends: BTreeSet<String>,
    pub filesystems: BTreeSet<String>,
    pub members: usize,
    pub unsupported: usize,
    pub cuts: usize,
    pub failed: usize,
}

/// Gathers `nodes` facts: Node objects (when readable), every group's members, and what each
/// node's agent reported in its NodeSnapshots (backends, filesystems, last activity).
pub fn node_facts(
    nodes: &[Node],
    groups: &[ConsistencyGroup],
    node_snapshots: &[NodeSnapshot],
) -> Vec<NodeFacts> {
    let mut facts: BTreeMap<String, NodeFacts> = BTreeMap::new();
    let mut entry = |name: &str| -> NodeFacts {
        facts.remove(name).unwrap_or_else(|| NodeFacts {
            name: name.to_string(),
            ..Default::default()
        })
    };
    let mut put = Vec::new();
    for node in nodes {
        let mut f = entry(&node.name_any());
        let status = node.status.clone().unwrap_or_default();
        f.kernel = status.node_info.map(|i| i.kernel_version);
        f.ready = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status);
        put.push(f);
    }
    for f in put.drain(..) {
        facts.insert(f.name.clone(), f);
    }
    for group in groups {
        for member in group.status.iter().flat_map(|s| s.members.iter()) {
            let Some(node) = &member.node else { continue };
            let mut f = facts.remove(node).unwrap_or_else(|| NodeFacts {
                name: node.clone(),
                ..Default::default()
            });
            if member.supported {
                f.members += 1;
            } else {
                f.unsupported += 1;
            }
            facts.insert(node.clone(), f);
        }
    }
    for ns in node_snapshots {
        let node = &ns.spec.node_name;
        let mut f = facts.remove(node).unwrap_or_else(|| NodeFacts {
            name: node.clone(),
            ..Default::default()
        });
        f.cuts += 1;
        if let Some(status) = &ns.status {
            if status.phase == crate::api::NodePhase::Failed {
                f.failed += 1;
            }
            for v in &status.volumes {
                if let Some(b) = &v.backend {
                    f.backends.insert(b.clone());
                }
                if let Some(fs) = &v.filesystem {
                    f.filesystems.insert(fs.clone());
                }
            }
            // The agent writes the status; its last write is when it was last seen.
            let seen = ns
                .metadata
                .managed_fields
                .iter()
                .flatten()
                .filter(|m| m.subresource.as_deref() == Some("status"))
                .filter_map(|m| m.time.as_ref().map(|t| t.0))
                .max()
                .or_else(|| {
                    status
                        .volumes
                        .iter()
                        .filter_map(|v| v.cut_time.as_ref().map(|t| t.0))
                        .max()
                });
            if let Some(seen) = seen {
                f.agent_seen = Some(f.agent_seen.map_or(seen, |s| s.max(seen)));
            }
        }
        facts.insert(node.clone(), f);
    }
    facts.into_values().collect()
}

fn set_text(set: &BTreeSet<String>) -> String {
    if set.is_empty() {
        "<none>".into()
    } else {
        set.iter().cloned().collect::<Vec<_>>().join(",")
    }
}

/// `nodes`.
pub fn nodes_table(facts: &[NodeFacts], wide: bool, now: Timestamp) -> String {
    let mut base = vec![
        "NODE",
        "READY",
        "KERNEL",
        "AGENT-SEEN",
        "MEMBERS",
        "UNSUPPORTED",
        "BACKENDS",
    ];
    if wide {
        base.extend(["FILESYSTEMS", "NODESNAPSHOTS", "FAILED"]);
    }
    let rows: Vec<Vec<String>> = facts
        .iter()
        .map(|f| {
            let mut row = vec![
                f.name.clone(),
                or_none(f.ready.clone()),
                or_none(f.kernel.clone()),
                f.agent_seen
                    .map(|t| format!("{} ago", age(now.as_second() - t.as_second())))
                    .unwrap_or_else(|| "never".into()),
                f.members.to_string(),
                f.unsupported.to_string(),
                set_text(&f.backends),
            ];
            if wide {
                row.push(set_text(&f.filesystems));
                row.push(f.cuts.to_string());
                row.push(f.failed.to_string());
            }
            row
        })
        .collect();
    table(&base, &rows)
}

/// `schedule list`.
pub fn schedules_table(
    schedules: &[crate::api::GroupSnapshotSchedule],
    wide: bool,
    all: bool,
    now: Timestamp,
) -> String {
    let mut base = vec![
        "NAME",
        "GROUP",
        "SCHEDULE",
        "ZONE",
        "SUSPEND",
        "NEXT-RUN",
        "LAST-READY",
        "KEPT",
        "READY",
        "AGE",
    ];
    if wide {
        base.extend(["REASON", "MISSED", "SKIPPED"]);
    }
    let rows: Vec<Vec<String>> = schedules
        .iter()
        .map(|s| {
            let status = s.status.clone().unwrap_or_default();
            let mut row = vec![
                s.name_any(),
                s.spec.group_name.clone(),
                s.spec.schedule.clone(),
                s.spec.time_zone.clone(),
                s.spec.suspend.to_string(),
                or_none(status.next_run_time.as_ref().map(|t| in_time(t.0, now))),
                or_none(status.last_ready_snapshot.clone()),
                status.kept.total.to_string(),
                ready_condition(&status.conditions),
                age_of(&s.metadata, now),
            ];
            if wide {
                row.push(
                    status
                        .conditions
                        .iter()
                        .find(|c| c.type_ == CONDITION_READY)
                        .map(|c| c.reason.clone())
                        .unwrap_or_else(|| "<none>".into()),
                );
                row.push(status.missed_runs.to_string());
                row.push(status.skipped_runs.to_string());
            }
            with_namespace(all, s.namespace(), row)
        })
        .collect();
    table(&headers(all, &base), &rows)
}

/// A future time as "in 5m", a past one as "5m ago".
fn in_time(t: Timestamp, now: Timestamp) -> String {
    let d = t.as_second() - now.as_second();
    if d >= 0 {
        format!("in {}", age(d))
    } else {
        format!("{} ago", age(-d))
    }
}

/// `schedule show`: the spec, the status, and the schedule's snapshots.
pub fn schedule_page(
    schedule: &crate::api::GroupSnapshotSchedule,
    snapshots: &[GroupSnapshot],
    now: Timestamp,
) -> String {
    let status = schedule.status.clone().unwrap_or_default();
    let mut out = String::new();
    let field = |out: &mut String, k: &str, v: String| {
        let _ = writeln!(out, "{:<18}{v}", format!("{k}:"));
    };
    field(&mut out, "Name", schedule.name_any());
    field(
        &mut out,
        "Namespace",
        schedule.namespace().unwrap_or_default(),
    );
    field(&mut out, "Group", schedule.spec.group_name.clone());
    field(
        &mut out,
        "Schedule",
        format!("{} in {}", schedule.spec.schedule, schedule.spec.time_zone),
    );
    field(&mut out, "Suspend", schedule.spec.suspend.to_string());
    field(
        &mut out,
        "Deadline",
        or_none(
            schedule
                .spec
                .starting_deadline_seconds
                .map(|s| format!("{s}s")),
        ),
    );
    field(
        &mut out,
        "Deletion policy",
        debug_word(schedule.spec.template.spec.deletion_policy),
    );
    field(
        &mut out,
        "Retention",
        match &schedule.spec.retention {
            None => "<none> (every snapshot is kept)".into(),
            Some(r) => {
                let mut parts = Vec::new();
                for (k, v) in [
                    ("keepLast", r.keep_last),
                    ("hourly", r.hourly),
                    ("daily", r.daily),
                    ("weekly", r.weekly),
                    ("monthly", r.monthly),
                    ("yearly", r.yearly),
                ] {
                    if let Some(v) = v {
                        parts.push(format!("{k} {v}"));
                    }
                }
                if let Some(a) = &r.max_age {
                    parts.push(format!("maxAge {a}"));
                }
                parts.push(format!("minReady {}", r.min_ready));
                if r.delete_snapshots_with_schedule {
                    parts.push("snapshots deleted with the schedule".into());
                }
                parts.join(", ")
            }
        },
    );
    field(
        &mut out,
        "Next run",
        or_none(
            status
                .next_run_time
                .as_ref()
                .map(|t| format!("{} ({})", t.0, in_time(t.0, now))),
        ),
    );
    field(
        &mut out,
        "Last run",
        or_none(status.last_run_time.as_ref().map(|t| {
            format!(
                "{} ({})",
                t.0,
                status.last_run_snapshot.clone().unwrap_or_default()
            )
        })),
    );
    field(
        &mut out,
        "Last Ready",
        or_none(status.last_ready_snapshot.clone()),
    );
    field(&mut out, "Active", or_none(status.active.clone()));
    field(
        &mut out,
        "Runs",
        format!(
            "{} missed, {} skipped (one unfinished), {} deleted by retention",
            status.missed_runs, status.skipped_runs, status.retention_deleted
        ),
    );
    field(
        &mut out,
        "Kept",
        format!(
            "{} ({} Ready, {} Failed, {} pinned)",
            status.kept.total, status.kept.ready, status.kept.failed, status.kept.pinned
        ),
    );
    if let Some(message) = &status.message {
        field(&mut out, "Message", message.clone());
    }
    if let Some(ready) = status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_READY)
    {
        field(
            &mut out,
            "Ready",
            format!("{} ({}): {}", ready.status, ready.reason, ready.message),
        );
    }
    out.push_str("\nSnapshots:\n");
    let rows: Vec<Vec<String>> = snapshots
        .iter()
        .map(|s| {
            let st = s.status.clone().unwrap_or_default();
            vec![
                s.name_any(),
                debug_word(st.phase),
                or_none(st.consistency.map(debug_word)),
                or_none(st.freeze_window_millis),
                age_of(&s.metadata, now),
            ]
        })
        .collect();
    out.push_str(&indent(&table(
        &["NAME", "PHASE", "CONSISTENCY", "FREEZE-MS", "AGE"],
        &rows,
    )));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{GroupSnapshotSpec, GroupSnapshotStatus, MemberSnapshot};

    #[test]
    fn ages() {
        for (s, want) in [
            (-5, "0s"),
            (45, "45s"),
            (119, "119s"),
            (120, "2m"),
            (192, "3m12s"),
            (1500, "25m"),
            (18000, "5h"),
            (3 * 86400, "3d"),
        ] {
            assert_eq!(age(s), want, "{s}");
        }
    }

    #[test]
    fn tables_pad_like_kubectl() {
        let t = table(
            &["NAME", "PHASE"],
            &[
                vec!["a".into(), "Ready".into()],
                vec!["long-name".into(), "".into()],
            ],
        );
        assert_eq!(t, "NAME        PHASE\na           Ready\nlong-name\n");
    }

    fn snapshot(
        consistency: Option<Consistency>,
        members: &[(&str, bool, Option<&str>)],
    ) -> GroupSnapshot {
        let mut s = GroupSnapshot::new(
            "s",
            GroupSnapshotSpec {
                group_name: "g".into(),
                ..Default::default()
            },
        );
        s.status = Some(GroupSnapshotStatus {
            phase: if consistency.is_some() {
                GroupSnapshotPhase::Ready
            } else {
                GroupSnapshotPhase::Failed
            },
            consistency,
            message: Some("agent gone".into()),
            members: members
                .iter()
                .map(|(claim, frozen, message)| MemberSnapshot {
                    claim: claim.to_string(),
                    frozen: *frozen,
                    message: message.map(str::to_string),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        s
    }

    #[test]
    fn consistency_reasons() {
        let frozen = snapshot(
            Some(Consistency::FilesystemFrozen),
            &[("a", true, None), ("b", true, None)],
        );
        assert!(consistency_why(&frozen, None).starts_with("FilesystemFrozen: all 2 members"));
        let partial = snapshot(
            Some(Consistency::Independent),
            &[
                ("a", true, None),
                ("b", false, Some("btrfs cannot be frozen here")),
            ],
        );
        let why = consistency_why(&partial, Some(FreezePolicy::BestEffort));
        assert_eq!(
            why,
            "Independent: each member snapshot is consistent on its own, not as a set; not frozen: b (btrfs cannot be frozen here)"
        );
        let disabled = snapshot(Some(Consistency::Independent), &[("a", false, None)]);
        assert!(consistency_why(&disabled, Some(FreezePolicy::Disabled)).contains("Disabled"));
        let failed = snapshot(None, &[]);
        assert_eq!(
            consistency_why(&failed, None),
            "none: the snapshot failed: agent gone"
        );
    }

    #[test]
    fn node_facts_join_nodes_members_and_agent_reports() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "status": {"nodeInfo": {"kernelVersion": "6.12.1", "machineID": "", "systemUUID": "",
                "bootID": "", "kubeletVersion": "", "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": "amd64", "containerRuntimeVersion": "", "osImage": ""},
                "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("node");
        let group: ConsistencyGroup = serde_json::from_value(serde_json::json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "ConsistencyGroup",
            "metadata": {"name": "g"}, "spec": {"claims": ["a"]},
            "status": {"members": [
                {"claim": "a", "node": "n1", "supported": true},
                {"claim": "b", "node": "n2", "supported": false}]}
        }))
        .expect("group");
        let nsnap: NodeSnapshot = serde_json::from_value(serde_json::json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "NodeSnapshot",
            "metadata": {"name": "x"},
            "spec": {"nodeName": "n1", "groupSnapshot": "s", "freezeTimeoutSeconds": 10},
            "status": {"phase": "Released", "volumes": [
                {"claim": "a", "backend": "reflink", "filesystem": "xfs", "frozen": true,
                 "cutTime": "2026-01-01T00:00:00Z"}]}
        }))
        .expect("nsnap");
        let facts = node_facts(&[node], &[group], &[nsnap]);
        assert_eq!(facts.len(), 2);
        assert_eq!(facts[0].name, "n1");
        assert_eq!(facts[0].kernel.as_deref(), Some("6.12.1"));
        assert_eq!(facts[0].members, 1);
        assert_eq!(facts[0].backends, BTreeSet::from(["reflink".to_string()]));
        assert!(facts[0].agent_seen.is_some());
        assert_eq!(facts[1].name, "n2");
        assert_eq!(facts[1].unsupported, 1);
        assert_eq!(facts[1].agent_seen, None);
    }
}
