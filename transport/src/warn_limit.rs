//! Rate-limited warnings: one line per interval for things a peer or a
//! failing neighbour can cause many times a second (refused connections,
//! failed fetches), with the number of lines held back.

use std::time::Duration;

/// Rate limit for warnings that a peer can trigger at will (refused
/// connections, bad hellos): one line per interval, with the number of
/// lines held back since the last one.
pub struct WarnLimiter {
    interval: Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl WarnLimiter {
    pub const fn new(interval: Duration) -> Self {
        WarnLimiter { interval, state: std::sync::Mutex::new((None, 0)) }
    }

    /// Some(n) when a line may be logged now, `n` being the lines held back
    /// since the last one; None to stay quiet.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap();
        let now = std::time::Instant::now();
        if s.0.is_none_or(|t| now.duration_since(t) >= self.interval) {
            s.0 = Some(now);
            return Some(std::mem::take(&mut s.1));
        }
        s.1 += 1;
        None
    }
}
