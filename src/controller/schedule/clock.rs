//! The schedule controller's clock: the system's, or (debug builds only, for tests) a time read
//! from a file on every evaluation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;

/// What time it is, as far as schedules are concerned.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// The test-only clock: the RFC 3339 timestamp in a file, read on each call. A missing or
/// unreadable file reads as the system time (and is logged).
pub struct FileClock {
    path: PathBuf,
}

impl FileClock {
    fn read(&self) -> Option<Timestamp> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        text.trim().parse().ok()
    }
}

impl Clock for FileClock {
    fn now(&self) -> Timestamp {
        self.read().unwrap_or_else(|| {
            tracing::warn!(path = %self.path.display(), "test clock file unreadable; using the system time");
            Timestamp::now()
        })
    }
}

/// The variable naming the test clock's file; read by debug builds only (what `cargo test`
/// builds), never by a release build.
pub const TEST_CLOCK_ENV: &str = "TANDEM_TEST_ONLY_CLOCK_FILE";

/// The clock to run with, and for the test clock a stream that ticks whenever the file's time
/// changes (so every schedule is evaluated at the new time, as a due-time wake-up would).
pub fn from_env() -> (
    Arc<dyn Clock>,
    Option<tokio::sync::mpsc::UnboundedReceiver<()>>,
) {
    let path = if cfg!(debug_assertions) {
        std::env::var_os(TEST_CLOCK_ENV).map(PathBuf::from)
    } else {
        None
    };
    let Some(path) = path else {
        return (Arc::new(SystemClock), None);
    };
    tracing::warn!(path = %path.display(), "schedules run on the test clock");
    let clock = Arc::new(FileClock { path });
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let watched = clock.clone();
    tokio::spawn(async move {
        let mut last = watched.read();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = watched.read();
            if now != last {
                last = now;
                if tx.send(()).is_err() {
                    return;
                }
            }
        }
    });
    (clock, Some(rx))
}
