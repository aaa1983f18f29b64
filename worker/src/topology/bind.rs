//! Pinning the calling process to its cores and its memory to its NUMA node
//! (Linux). Workers bind themselves at start-up, before they start threads,
//! so every thread they make inherits the binding.
//!
//! Binding stays inside the CPUs the process may use: in a Slurm cpuset a
//! core outside it is dropped, and when nothing is left, or the kernel
//! refuses, the worker runs unbound with a warning rather than failing
//! (`sched_setaffinity` EINVAL inside cpusets is what dask-cuda users hit).

/// What binding did, for logs and for the worker's registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The CPUs the process now runs on.
    pub cpus: Vec<u32>,
    /// The NUMA node memory is taken from first, if set.
    pub numa: Option<u32>,
    /// Why some of what was asked could not be done.
    pub warnings: Vec<String>,
}

/// The CPUs the calling thread may run on.
pub fn allowed_cpus() -> std::io::Result<Vec<u32>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize).filter(|&i| libc::CPU_ISSET(i, &set)).map(|i| i as u32).collect())
    }
}

/// Binds the calling process (all threads it starts from now on) to `cpus`
/// (only those it may use) and prefers memory from NUMA node `numa`.
///
/// Memory uses MPOL_PREFERRED, not MPOL_BIND: pages come from the worker's
/// node while it has room and from other nodes after that, so a worker that
/// outgrows its node slows down instead of being killed by the OOM killer.
pub fn bind_process(cpus: &[u32], numa: Option<u32>) -> Bound {
    let mut warnings = Vec::new();
    let allowed = allowed_cpus().unwrap_or_default();
    let wanted: Vec<u32> = cpus.iter().copied().filter(|c| allowed.contains(c)).collect();
    if wanted.len() < cpus.len() {
        let outside: Vec<u32> = cpus.iter().copied().filter(|c| !allowed.contains(c)).collect();
        warnings.push(format!(
            "CPUs {} are outside this process's allowed set {}; not using them",
            super::cpu_list(&outside),
            super::cpu_list(&allowed)
        ));
    }
    let mut now = allowed.clone();
    if wanted.is_empty() {
        if !cpus.is_empty() {
            warnings.push("none of the asked-for CPUs may be used here; running unbound".into());
        }
    } else {
        // SAFETY: cpu_set_t is plain data; CPU_SET indexes are checked to be
        // below CPU_SETSIZE; sched_setaffinity reads the set.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in &wanted {
                if (c as usize) < libc::CPU_SETSIZE as usize {
                    libc::CPU_SET(c as usize, &mut set);
                }
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if rc == 0 {
            now = wanted;
        } else {
            warnings.push(format!("sched_setaffinity refused ({}); running unbound", std::io::Error::last_os_error()));
        }
    }
    let mut bound_numa = None;
    if let Some(node) = numa {
        match prefer_numa_node(node) {
            Ok(()) => bound_numa = Some(node),
            Err(e) => warnings.push(format!("cannot prefer memory from NUMA node {node} ({e}); memory is not bound")),
        }
    }
    Bound { cpus: now, numa: bound_numa, warnings }
}

fn prefer_numa_node(node: u32) -> std::io::Result<()> {
    const MPOL_PREFERRED: libc::c_long = 1;
    if node >= 1024 {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    let mut mask = [0u64; 16];
    mask[(node / 64) as usize] |= 1u64 << (node % 64);
    // SAFETY: set_mempolicy reads `maxnode` bits from `mask`, which holds 1024.
    let rc = unsafe {
        libc::syscall(libc::SYS_set_mempolicy, MPOL_PREFERRED, mask.as_ptr(), (mask.len() * 64) as libc::c_ulong)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
