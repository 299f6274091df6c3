//! The watchdog: every freeze is thawed after `freezeTimeoutSeconds` on the agent's own monotonic
//! clock, whatever the controller or the API server do. One plain OS thread per held cut, armed
//! before the first freeze, so neither a stuck async runtime nor a slow API call can delay it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::engine::{Cut, Engine};

/// Starts the watchdog of a cut: at `timeout` from now it aborts the cut unless it was thawed.
/// An error means no watchdog runs, and the caller must not freeze.
pub(crate) fn arm(engine: Engine, cut: Arc<Cut>, timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    let key = Engine::cut_key(&cut).to_string();
    std::thread::Builder::new()
        .name("tandem-watchdog".into())
        .spawn(move || {
            if !Engine::cut_wait_thawed(&cut, deadline) {
                engine.watchdog_fired(&key, timeout);
            }
        })
        .map(|_| ())
}
