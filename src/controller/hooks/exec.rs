//! Exec into pods over the API server's WebSocket (kube's `ws` feature): commands run to
//! completion, and holds: a session whose command stays running, with stdin open, until it is
//! released by writing to and closing its stdin (a v5 stream close).
//!
//! An exec client going away does not stop the command in the container, so every command can be
//! wrapped in `timeout -s KILL <seconds>` ([`wrapped`]): the container ends it on its own clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use kube::Api;
use kube::api::{AttachParams, AttachedProcess};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{oneshot, watch};

use crate::api::HookWrap;

/// How much of a command's output a failure message keeps.
const TAIL: usize = 400;

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Its exit code, when the API server reported one (0 on success).
    pub exit_code: Option<i32>,
    /// Whether it ran to exit 0.
    pub success: bool,
    /// What happened, in words (with the end of stderr on a failure).
    pub message: Option<String>,
}

impl Outcome {
    fn failed(message: String) -> Outcome {
        Outcome {
            exit_code: None,
            success: false,
            message: Some(message),
        }
    }
}

/// The command line tandem runs: with `wrap: Timeout`, under `timeout -s KILL <seconds>`.
pub fn wrapped(command: &[String], wrap: HookWrap, deadline: Duration) -> Vec<String> {
    match wrap {
        HookWrap::None => command.to_vec(),
        HookWrap::Timeout => {
            let mut line = vec![
                "timeout".to_string(),
                "-s".into(),
                "KILL".into(),
                deadline.as_secs().max(1).to_string(),
            ];
            line.extend_from_slice(command);
            line
        }
    }
}

/// The exit of a command from the status the API server sent on the status channel.
pub fn outcome_of(status: Option<&Status>, stderr_tail: &str) -> Outcome {
    let Some(status) = status else {
        return Outcome::failed(with_tail(
            "the exec stream ended without an exit status".into(),
            stderr_tail,
        ));
    };
    if status.status.as_deref() == Some("Success") {
        return Outcome {
            exit_code: Some(0),
            success: true,
            message: None,
        };
    }
    let exit_code = status
        .details
        .as_ref()
        .and_then(|d| d.causes.as_ref())
        .and_then(|causes| {
            causes
                .iter()
                .find(|c| c.reason.as_deref() == Some("ExitCode"))
        })
        .and_then(|c| c.message.as_deref())
        .and_then(|m| m.parse::<i32>().ok());
    let what = match exit_code {
        Some(137) => "killed (exit 137: its in-container deadline, or out of memory)".to_string(),
        Some(code) => format!("exited {code}"),
        None => status
            .message
            .clone()
            .unwrap_or_else(|| "failed without a message".into()),
    };
    Outcome {
        exit_code,
        success: false,
        message: Some(with_tail(what, stderr_tail)),
    }
}

fn with_tail(message: String, tail: &str) -> String {
    let tail = tail.trim();
    if tail.is_empty() {
        message
    } else {
        format!("{message}: {tail}")
    }
}

/// Keeps the last [`TAIL`] bytes of a stream, draining it so the exec never stalls on a full buffer.
fn drain(stream: Option<impl AsyncRead + Unpin + Send + 'static>) -> Arc<Mutex<String>> {
    let tail = Arc::new(Mutex::new(String::new()));
    if let Some(mut stream) = stream {
        let keep = tail.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut t = keep.lock().unwrap_or_else(|p| p.into_inner());
                t.push_str(&String::from_utf8_lossy(&buf[..n]));
                if t.len() > TAIL {
                    let mut cut = t.len() - TAIL;
                    while !t.is_char_boundary(cut) {
                        cut += 1;
                    }
                    t.drain(..cut);
                }
            }
        });
    }
    tail
}

fn tail_of(tail: &Arc<Mutex<String>>) -> String {
    tail.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

async fn start(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    command: &[String],
    stdin: bool,
) -> Result<AttachedProcess, Outcome> {
    let params = AttachParams::default()
        .container(container)
        .stdin(stdin)
        .stdout(true)
        .stderr(true);
    pods.exec(pod, command.to_vec(), &params)
        .await
        .map_err(|e| Outcome::failed(format!("exec into {pod}/{container} failed: {e}")))
}

/// Runs a command to completion, waiting at most `timeout` for it to end.
pub async fn run(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    command: &[String],
    timeout: Duration,
) -> Outcome {
    let work = async {
        let mut process = start(pods, pod, container, command, false).await?;
        let _stdout = drain(process.stdout());
        let stderr = drain(process.stderr());
        let status = process.take_status();
        let status = match status {
            Some(status) => status.await,
            None => None,
        };
        // The stream may still be delivering the last stderr bytes.
        let _ = tokio::time::timeout(Duration::from_millis(200), process.join()).await;
        Ok::<_, Outcome>(outcome_of(status.as_ref(), &tail_of(&stderr)))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(outcome)) | Ok(Err(outcome)) => outcome,
        Err(_) => Outcome::failed(format!(
            "did not end within {} s",
            timeout.as_secs_f64().round()
        )),
    }
}

/// The command that shows a container has `timeout` (coreutils' or busybox's).
pub const TIMEOUT_PROBE: [&str; 5] = ["timeout", "-s", "KILL", "5", "true"];

/// What a failed [`TIMEOUT_PROBE`] means, in words a person can act on.
pub fn timeout_missing(container: &str, probe: &Outcome) -> Outcome {
    Outcome::failed(format!(
        "wrap: Timeout needs the `timeout` utility in container {container} and `{}` failed ({}): add coreutils or busybox to the image, or set wrap: None with a command that ends on stdin EOF",
        TIMEOUT_PROBE.join(" "),
        probe.message.as_deref().unwrap_or("no exit status")
    ))
}

/// Checks that `container` can run `timeout` (before a wrapped hold, whose deadline it is).
pub async fn probe_timeout(pods: &Api<Pod>, pod: &str, container: &str) -> Result<(), Outcome> {
    let probe: Vec<String> = TIMEOUT_PROBE.iter().map(|s| s.to_string()).collect();
    let outcome = run(pods, pod, container, &probe, Duration::from_secs(10)).await;
    if outcome.success {
        Ok(())
    } else {
        Err(timeout_missing(container, &outcome))
    }
}

/// How a hold ended once its release was sent: it held through the cut, so it succeeded
/// whatever its exit; how it ended is kept in the message.
pub fn after_release(outcome: Outcome) -> Outcome {
    if outcome.success {
        return outcome;
    }
    Outcome {
        success: true,
        message: Some(format!(
            "released; then {}",
            outcome
                .message
                .as_deref()
                .unwrap_or("ended without an exit status")
        )),
        ..outcome
    }
}

/// A hold: a running command with its stdin open.
pub struct Hold {
    stdin: Option<tokio::io::WriteHalf<tokio::io::SimplexStream>>,
    ended: watch::Receiver<Option<Outcome>>,
    abort: Arc<Mutex<Option<AttachedProcess>>>,
}

impl Hold {
    /// Starts `command`, writes `stdin`, and waits at most `timeout` for a stdout line equal to
    /// `ready_line`. On failure the session is closed (its stdin too) before returning.
    pub async fn open(
        pods: &Api<Pod>,
        pod: &str,
        container: &str,
        command: &[String],
        stdin: Option<&str>,
        ready_line: &str,
        timeout: Duration,
    ) -> Result<Hold, Outcome> {
        let mut process = start(pods, pod, container, command, true).await?;
        let mut writer = process.stdin();
        let stdout = process.stdout();
        let stderr = drain(process.stderr());
        let status = process.take_status();
        let (ready_tx, ready_rx) = oneshot::channel::<()>();
        let ready_line = ready_line.trim().to_string();
        if let Some(stdout) = stdout {
            tokio::spawn(async move {
                let mut ready_tx = Some(ready_tx);
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.trim() == ready_line
                        && let Some(tx) = ready_tx.take()
                    {
                        let _ = tx.send(());
                    }
                }
            });
        }
        let (ended_tx, ended) = watch::channel(None);
        let abort = Arc::new(Mutex::new(Some(process)));
        tokio::spawn(async move {
            let status = match status {
                Some(status) => status.await,
                None => None,
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = ended_tx.send(Some(outcome_of(status.as_ref(), &tail_of(&stderr))));
        });
        if let (Some(text), Some(w)) = (stdin, writer.as_mut())
            && let Err(e) = w.write_all(text.as_bytes()).await
        {
            return Err(Outcome::failed(format!("writing stdin failed: {e}")));
        }
        let mut hold = Hold {
            stdin: writer,
            ended,
            abort,
        };
        let mut ended = hold.ended.clone();
        let result = tokio::time::timeout(timeout, async {
            tokio::select! {
                _ = ready_rx => None,
                _ = ended.wait_for(|e| e.is_some()) => Some(()),
            }
        })
        .await;
        match result {
            Ok(None) => Ok(hold),
            Ok(Some(())) => {
                let outcome = hold
                    .ended()
                    .unwrap_or_else(|| Outcome::failed("ended before it was ready".into()));
                Err(Outcome {
                    success: false,
                    message: Some(format!(
                        "ended before it was ready: {}",
                        outcome.message.as_deref().unwrap_or("exit 0")
                    )),
                    ..outcome
                })
            }
            Err(_) => {
                hold.close(Duration::from_secs(1)).await;
                Err(Outcome::failed(format!(
                    "was not ready within {} s",
                    timeout.as_secs()
                )))
            }
        }
    }

    /// How the command ended, if it did.
    pub fn ended(&self) -> Option<Outcome> {
        self.ended.borrow().clone()
    }

    /// Releases: writes `text`, closes stdin if asked, and waits at most `grace` for the command
    /// to end. A command that ended before its release had not held through the cut: failure.
    /// One that ends badly (or not at all) after the release was sent held through it: success,
    /// with how it ended in the message ([`after_release`]).
    pub async fn release(
        mut self,
        text: Option<&str>,
        close_stdin: bool,
        grace: Duration,
    ) -> Outcome {
        if let Some(outcome) = self.ended() {
            self.abort();
            return Outcome {
                success: false,
                message: Some(format!(
                    "the hold ended before its release: {}",
                    outcome.message.as_deref().unwrap_or("exit 0")
                )),
                ..outcome
            };
        }
        if let (Some(text), Some(w)) = (text, self.stdin.as_mut()) {
            let _ = w.write_all(text.as_bytes()).await;
        }
        if close_stdin && let Some(mut w) = self.stdin.take() {
            let _ = w.shutdown().await;
            drop(w);
        }
        let mut ended = self.ended.clone();
        let waited = tokio::time::timeout(grace, ended.wait_for(|e| e.is_some())).await;
        let outcome = match waited {
            Ok(Ok(e)) => e
                .clone()
                .unwrap_or_else(|| Outcome::failed("no exit".into())),
            _ => Outcome::failed(format!(
                "did not end within {} s of its release; its in-container deadline ends it",
                grace.as_secs()
            )),
        };
        self.abort();
        after_release(outcome)
    }

    /// Closes the session without a release text (stdin EOF), waiting at most `grace`.
    pub async fn close(&mut self, grace: Duration) {
        if let Some(mut w) = self.stdin.take() {
            let _ = w.shutdown().await;
        }
        let mut ended = self.ended.clone();
        let _ = tokio::time::timeout(grace, ended.wait_for(|e| e.is_some())).await;
        self.abort();
    }

    fn abort(&self) {
        if let Some(process) = self.abort.lock().unwrap_or_else(|p| p.into_inner()).take() {
            process.abort();
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_timeout_wrap_prefixes_a_kill_deadline() {
        let command = vec!["mysql".to_string(), "-N".into()];
        assert_eq!(
            wrapped(&command, HookWrap::Timeout, Duration::from_millis(20_500)),
            ["timeout", "-s", "KILL", "20", "mysql", "-N"]
        );
        assert_eq!(
            wrapped(&command, HookWrap::Timeout, Duration::ZERO),
            ["timeout", "-s", "KILL", "1", "mysql", "-N"]
        );
        assert_eq!(wrapped(&command, HookWrap::None, Duration::ZERO), command);
    }

    #[test]
    fn a_hold_that_dies_after_its_release_is_recorded_not_failed() {
        let ok = Outcome {
            exit_code: Some(0),
            success: true,
            message: None,
        };
        assert_eq!(after_release(ok.clone()), ok);
        let died = after_release(Outcome {
            exit_code: Some(1),
            success: false,
            message: Some("exited 1: lost connection".into()),
        });
        assert!(died.success, "{died:?}");
        assert_eq!(died.exit_code, Some(1));
        assert_eq!(
            died.message.as_deref(),
            Some("released; then exited 1: lost connection")
        );
        let stream = after_release(Outcome::failed(String::new()));
        assert!(stream.success);
    }

    #[test]
    fn a_missing_timeout_says_what_to_do() {
        let missing = timeout_missing(
            "db",
            &Outcome::failed("exec: \"timeout\": executable file not found in $PATH".into()),
        );
        let message = missing.message.unwrap_or_default();
        assert!(!missing.success);
        for needle in ["container db", "executable file not found", "wrap: None"] {
            assert!(message.contains(needle), "{needle} in {message}");
        }
    }

    #[test]
    fn exit_codes_come_from_the_status_channel() {
        let status = |v: serde_json::Value| serde_json::from_value::<Status>(v).expect("status");
        let ok = status(json!({"status": "Success"}));
        assert!(outcome_of(Some(&ok), "").success);
        let failed = status(json!({"status": "Failure", "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}}));
        assert_eq!(
            outcome_of(Some(&failed), " boom\n"),
            Outcome {
                exit_code: Some(3),
                success: false,
                message: Some("exited 3: boom".into())
            }
        );
        let killed = status(json!({"status": "Failure",
            "details": {"causes": [{"reason": "ExitCode", "message": "137"}]}}));
        assert!(
            outcome_of(Some(&killed), "")
                .message
                .is_some_and(|m| m.contains("deadline"))
        );
        let not_found =
            status(json!({"status": "Failure", "message": "executable file not found"}));
        assert_eq!(
            outcome_of(Some(&not_found), "").message.as_deref(),
            Some("executable file not found")
        );
        assert!(!outcome_of(None, "").success);
    }
}
