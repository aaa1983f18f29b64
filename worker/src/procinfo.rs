//! A process's CPU time and memory from /proc (Linux): for worker
//! heartbeats (the dashboard's CPU and memory per worker) and benchmarks.

use std::io::{Error, ErrorKind, Result};
use std::time::Duration;

fn bad(what: &str) -> Error {
    Error::new(ErrorKind::InvalidData, what.to_string())
}

/// User + system CPU time of a process.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; fields resume after the last ')'.
    let rest = stat.get(stat.rfind(')').ok_or_else(|| bad("malformed stat"))? + 2..).ok_or_else(|| bad("short stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).ok_or_else(|| bad("malformed stat field"));
    let ticks = field(11)? + field(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// (current RSS, peak RSS) in bytes.
pub fn memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status.lines().find(|l| l.starts_with(name)).ok_or_else(|| bad("no such status line"))?;
        let kb: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).ok_or_else(|| bad("malformed status line"))?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// This process's resident memory, bytes (0 if unreadable): one small read
/// of /proc/self/statm, cheap enough to do before every task start.
pub fn rss_now() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    let page = *PAGE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64);
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else { return 0 };
    statm.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).map_or(0, |pages| pages * page)
}

/// CPU use of this process between calls, in percent of one core.
pub struct CpuMeter {
    last: Option<(std::time::Instant, Duration)>,
}

impl CpuMeter {
    pub fn new() -> Self {
        CpuMeter { last: None }
    }

    /// Percent of one core used since the previous call (0 the first time).
    pub fn percent(&mut self) -> f32 {
        let now = std::time::Instant::now();
        let Ok(cpu) = cpu_time(std::process::id()) else { return 0.0 };
        let pct = match self.last {
            Some((t, c)) if now > t => 100.0 * cpu.saturating_sub(c).as_secs_f64() / now.duration_since(t).as_secs_f64(),
            _ => 0.0,
        };
        self.last = Some((now, cpu));
        pct as f32
    }
}

impl Default for CpuMeter {
    fn default() -> Self {
        Self::new()
    }
}
