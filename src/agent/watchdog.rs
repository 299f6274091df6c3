//! The watchdog: every freeze is thawed after `freezeTimeoutSeconds` on the agent's own monotonic
//! clock, whatever the controller or the API server do. One plain OS thread per held cut, armed
//! before the first freeze, so neither a stuck async runtime nor a slow API call can delay it.
//!
//! It knows nothing of the engine: it waits on a [`ThawSignal`] until a deadline and calls
//! `on_fire` if the signal did not come.

use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// Set once a cut can no longer hold a freeze (everything it froze is thawed).
#[derive(Debug, Default)]
pub struct ThawSignal {
    thawed: Mutex<bool>,
    changed: Condvar,
}

impl ThawSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the cut thawed and wakes the watchdog.
    pub fn set(&self) {
        *self.thawed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }

    /// Whether the cut is thawed.
    pub fn is_set(&self) -> bool {
        *self.thawed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until set or until `deadline`; true if set.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut thawed = self.thawed.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if *thawed {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            thawed = match self.changed.wait_timeout(thawed, deadline - now) {
                Ok((t, _)) => t,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

/// Starts a watchdog: at `deadline` it calls `on_fire` unless `thawed` was set before. An error
/// means no watchdog runs, and the caller must not freeze.
pub fn arm(
    deadline: Instant,
    thawed: std::sync::Arc<ThawSignal>,
    on_fire: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("tandem-watchdog".into())
        .spawn(move || {
            if !thawed.wait_until(deadline) {
                on_fire();
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn fires_at_the_deadline_unless_thawed() {
        let (tx, rx) = mpsc::channel();
        let signal = Arc::new(ThawSignal::new());
        let start = Instant::now();
        arm(start + Duration::from_millis(100), signal, move || {
            let _ = tx.send(Instant::now());
        })
        .unwrap();
        let fired = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(fired >= start + Duration::from_millis(100));

        let (tx, rx) = mpsc::channel::<()>();
        let signal = Arc::new(ThawSignal::new());
        arm(
            Instant::now() + Duration::from_millis(200),
            signal.clone(),
            move || {
                let _ = tx.send(());
            },
        )
        .unwrap();
        signal.set();
        assert!(signal.is_set());
        assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    }
}
