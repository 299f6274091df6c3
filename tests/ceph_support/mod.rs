//! A real single-node Ceph for a test: brought up by hack/ceph-mini.sh in a fresh temp dir on
//! ports of its own, torn down when the guard drops (also when the test fails).

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A running cluster; stopped and removed on drop.
pub struct Ceph {
    /// What `ceph-mini.sh up` printed (CEPH_MON_HOST, CEPH_FSID, CEPH_USER, CEPH_KEY, ...).
    pub env: HashMap<String, String>,
    pub up_time: Duration,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/ceph-mini.sh")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Says something the test harness does not capture (a skip must be visible).
pub fn notice(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{message}");
}

/// A loopback port range `[base, base + len)` that is free now, below the kernel's ephemeral
/// range (where the other test binaries' `free_port()`s land), picked at random so two runs at
/// once do not meet.
fn free_port_range(len: u16) -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(2_654_435_761);
    for attempt in 0..200u32 {
        let slot = (seed.wrapping_add(attempt.wrapping_mul(7919)) % 1000) as u16;
        let base = 12_000 + slot * 20;
        let free = (base..base + len).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no free range of {len} loopback ports below 32000");
}

impl Ceph {
    /// Brings a cluster up, or `None` (with a SKIPPED notice) when TANDEM_SKIP_CEPH=1. Without
    /// the Ceph daemons the test fails: it must not pass silently on a machine that lacks them.
    pub fn up() -> Option<Ceph> {
        if std::env::var("TANDEM_SKIP_CEPH").as_deref() == Ok("1") {
            notice("SKIPPED: TANDEM_SKIP_CEPH=1 (no real Ceph cluster for the RBD group tests)");
            return None;
        }
        assert!(
            on_path("ceph-mon") && on_path("ceph-osd") && on_path("ceph"),
            "the Ceph daemons (ceph-mon, ceph-osd, ceph) are not installed: run \
             hack/install-test-deps.sh (or set TANDEM_SKIP_CEPH=1 to skip the RBD tests)"
        );
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("ceph");
        let mut last = String::new();
        // A second try on fresh ports, should another process take one of ours meanwhile.
        for _ in 0..2 {
            // The mon's port, then the OSD's range (it binds 4, one per messenger).
            let base = free_port_range(17);
            let start = Instant::now();
            let out = Command::new(script())
                .arg("up")
                .arg(&dir)
                .args([base, base + 1, base + 16].map(|p| p.to_string()))
                .output()
                .expect("cannot run hack/ceph-mini.sh");
            let up_time = start.elapsed();
            if out.status.success() {
                let env = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|line| line.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                return Some(Ceph {
                    env,
                    up_time,
                    dir,
                    _tmp: tmp,
                });
            }
            last = format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            down(&dir);
        }
        panic!("hack/ceph-mini.sh up failed twice:\n{last}");
    }

    /// A value `up` printed.
    pub fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("ceph-mini.sh printed no {key}: {:?}", self.env.keys()))
    }
}

fn down(dir: &Path) {
    match Command::new(script()).arg("down").arg(dir).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => notice(&format!(
            "hack/ceph-mini.sh down failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => notice(&format!("cannot run hack/ceph-mini.sh down: {e}")),
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the daemons said, before it is removed.
            for log in ["mon.a.log", "osd.0.log"] {
                if let Ok(text) = std::fs::read_to_string(self.dir.join("log").join(log)) {
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    notice(&format!("--- last lines of {log}:\n{}", tail.join("\n")));
                }
            }
        }
        down(&self.dir);
    }
}
