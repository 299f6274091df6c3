//! One-shot restores, for hosts without Kubernetes (the LVM test guest): clone the snapshots of an
//! earlier one-shot cut (`--oneshot-action restore`), re-attach those clones (`attach`), delete
//! them (`unrestore`). The cut is found in the cut journal under its key `oneshot-<ns>-<name>`, as
//! the agent finds a NodeSnapshot's; the clones are owned by `restore-<that key>` and journaled in
//! `<state_dir>/restores/oneshot/<key>.json` (planned handles written before anything is made, so
//! an `unrestore` after a crash removes whatever was made).

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::api::CloneMethod;

use super::backend::BackendKind;
use super::backend::clone::{self, CloneHandle, CloneInfo, CloneOptions};
use super::journal::{Journal, Stage};
use super::{AgentArgs, AgentError};

/// What the one-shot restore journal keeps.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OneshotRestore {
    /// The cut's key.
    pub cut: String,
    pub clones: Vec<OneshotClone>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OneshotClone {
    pub persistent_volume: String,
    pub backend: BackendKind,
    pub handle: CloneHandle,
}

/// One clone as printed.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reported {
    pub persistent_volume: String,
    pub backend: &'static str,
    pub method: CloneMethod,
    pub handle: String,
    pub path: PathBuf,
    pub block: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    pub size_bytes: u64,
    pub millis: u128,
    /// For a `Copy`: the copy's throughput.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mib_per_sec: Option<f64>,
}

fn report(pv: &str, backend: BackendKind, info: &CloneInfo, started: Instant) -> Reported {
    let secs = started.elapsed().as_secs_f64();
    Reported {
        persistent_volume: pv.into(),
        backend: backend.name(),
        method: info.method,
        handle: info.handle.to_string(),
        path: info.path.clone(),
        block: info.block,
        filesystem: info.filesystem.clone(),
        size_bytes: info.size_bytes,
        millis: started.elapsed().as_millis(),
        mib_per_sec: (info.method == CloneMethod::Copy && secs > 0.0)
            .then(|| (info.size_bytes as f64 / (1 << 20) as f64 / secs * 10.0).round() / 10.0),
    }
}

/// The journal file of a one-shot restore of the cut `key`.
pub fn journal_path(state_dir: &Path, key: &str) -> PathBuf {
    state_dir
        .join("restores")
        .join("oneshot")
        .join(format!("{key}.json"))
}

fn failed(why: impl Into<String>) -> AgentError {
    AgentError::OneshotRestore(why.into())
}

fn read(path: &Path) -> Result<Option<OneshotRestore>, AgentError> {
    match std::fs::read(path) {
        Ok(data) => Ok(Some(serde_json::from_slice(&data)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(failed(format!("read {}: {e}", path.display()))),
    }
}

fn write(path: &Path, restore: &OneshotRestore) -> Result<(), AgentError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(path);
    let io = |e: std::io::Error| failed(format!("write {}: {e}", path.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&serde_json::to_vec_pretty(restore)?)
        .and_then(|()| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// Runs `restore`, `attach` or `unrestore` for the one-shot cut the flags name; prints JSON.
pub fn run(args: &AgentArgs, options: &CloneOptions) -> Result<(), AgentError> {
    let key = format!("oneshot-{}-{}", args.oneshot_namespace, args.oneshot_name);
    let path = journal_path(&args.state_dir, &key);
    let out = match args.oneshot_action.as_str() {
        "unrestore" => unrestore(&path, options)?,
        "attach" => {
            let known = read(&path)?
                .ok_or_else(|| failed(format!("no one-shot restore of {key} to attach")))?;
            attach(&known, options)?
        }
        _ => match read(&path)? {
            // Already restored: attach what is there (the clones are not made twice).
            Some(known) => attach(&known, options)?,
            None => restore(
                &args.state_dir,
                &key,
                &args.oneshot_namespace,
                &path,
                options,
            )?,
        },
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

fn attach(known: &OneshotRestore, options: &CloneOptions) -> Result<serde_json::Value, AgentError> {
    let mut done = Vec::new();
    for c in &known.clones {
        let started = Instant::now();
        let info = clone::attach(&c.handle, options)?;
        done.push(report(&c.persistent_volume, c.backend, &info, started));
    }
    Ok(serde_json::json!({ "attached": done }))
}

fn unrestore(path: &Path, options: &CloneOptions) -> Result<serde_json::Value, AgentError> {
    let Some(known) = read(path)? else {
        return Ok(serde_json::json!({ "deleted": [] }));
    };
    let mut deleted = Vec::new();
    let mut problems = Vec::new();
    for c in &known.clones {
        match clone::delete(&c.handle, options) {
            Ok(d) => deleted.push(serde_json::json!({
                "persistentVolume": c.persistent_volume,
                "handle": c.handle.to_string(),
                "deleted": format!("{d:?}"),
            })),
            Err(e) => problems.push(format!("{}: {e}", c.handle)),
        }
    }
    if !problems.is_empty() {
        return Err(failed(problems.join("; ")));
    }
    std::fs::remove_file(path).map_err(|e| failed(format!("remove {}: {e}", path.display())))?;
    Ok(serde_json::json!({ "deleted": deleted }))
}

fn restore(
    state_dir: &Path,
    key: &str,
    namespace: &str,
    path: &Path,
    options: &CloneOptions,
) -> Result<serde_json::Value, AgentError> {
    let journal = Journal::open(state_dir)?;
    let entry = journal
        .get(key)?
        .ok_or_else(|| failed(format!("no one-shot cut {key} in the journal")))?;
    if entry.stage != Stage::Released {
        return Err(failed(format!(
            "the cut {key} is {:?}, not Released: it has no snapshots to restore",
            entry.stage
        )));
    }
    let owner = format!("restore-{key}");
    let volumes = entry.report.map(|r| r.volumes).unwrap_or_default();
    let mut planned = OneshotRestore {
        cut: key.into(),
        clones: Vec::new(),
    };
    let mut plans = Vec::new();
    for snapshot in &entry.made {
        let shown = snapshot.to_string();
        let pv = volumes
            .iter()
            .find(|v| v.snapshot_handle.as_deref() == Some(shown.as_str()))
            .map(|v| v.claim.clone())
            .ok_or_else(|| failed(format!("no volume of {key} has the snapshot {shown}")))?;
        let plan = clone::plan(snapshot, namespace, &pv, &owner, options)?;
        planned.clones.push(OneshotClone {
            persistent_volume: pv.clone(),
            backend: plan.backend,
            handle: plan.handle.clone(),
        });
        plans.push((pv, plan));
    }
    // The intent first: whatever the creates below make, an unrestore finds.
    write(path, &planned)?;
    let mut done = Vec::new();
    for (pv, plan) in &plans {
        let started = Instant::now();
        let mut last_report = Instant::now();
        let mut progress = |copied: u64, total: u64| {
            if last_report.elapsed().as_secs() >= 5 || copied == total {
                last_report = Instant::now();
                tracing::info!(pv, copied, total, "copying");
            }
        };
        match clone::create(plan, options, &mut progress) {
            Ok(info) => done.push(report(pv, plan.backend, &info, started)),
            Err(e) => {
                let _ = unrestore(path, options);
                return Err(AgentError::Backend(e));
            }
        }
    }
    Ok(serde_json::json!({ "restored": done }))
}
