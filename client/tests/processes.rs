//! Real processes: `rdask-scheduler` and `rdask-worker` binaries, driven by a
//! `Client` in the test process.
//!
//! The binaries belong to other packages, so `CARGO_BIN_EXE_*` is not set
//! here; they are looked up in the profile directory this test runs from
//! (`target/release/deps/processes-…` → `target/release/`). Build them first
//! with `cargo build --release --workspace --bins`; when they are missing the
//! tests say so and skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdask_client::graphs;
use rdask_client::{Client, ClientError, TaskDef};
use rdask_worker::NullTask;

// ------------------------------------------------------------------ helpers

const WAIT: Duration = Duration::from_secs(10);

/// `target/<profile>/<name>`, if it was built.
fn binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let path = profile_dir.join(name);
    path.exists().then_some(path)
}

/// Both binaries, or `None` after printing why the test is skipped.
fn binaries() -> Option<(PathBuf, PathBuf)> {
    match (binary("rdask-scheduler"), binary("rdask-worker")) {
        (Some(s), Some(w)) => Some((s, w)),
        _ => {
            eprintln!(
                "SKIPPED: rdask-scheduler / rdask-worker not found next to {:?}; \
                 run `cargo build --release --workspace --bins` first",
                std::env::current_exe().unwrap().parent().unwrap().parent().unwrap()
            );
            None
        }
    }
}

/// Child processes of one test, killed (and their logs shown) if the test
/// fails before stopping them; plus a scratch directory.
struct Procs {
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Procs {
    fn new(test: &str) -> Procs {
        let dir = std::env::temp_dir().join(format!("rdask-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Procs { dir, children: Vec::new() }
    }

    /// Starts `bin args…` with its stderr in `<dir>/<name>.log`; returns its index.
    fn spawn(&mut self, name: &str, bin: &Path, args: &[&str]) -> usize {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        self.children.push((name.to_string(), child));
        self.children.len() - 1
    }

    fn pid(&self, i: usize) -> i32 {
        self.children[i].1.id() as i32
    }

    fn signal(&self, i: usize, sig: i32) {
        // SAFETY: plain kill(2) on a child we started and have not reaped.
        assert_eq!(unsafe { libc::kill(self.pid(i), sig) }, 0, "kill {} failed", self.children[i].0);
    }

    /// The exit status, if the process has exited.
    fn exited(&mut self, i: usize) -> Option<ExitStatus> {
        self.children[i].1.try_wait().unwrap()
    }

    /// Waits (bounded) for the process to exit.
    async fn wait_exit(&mut self, i: usize) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.exited(i) {
                return s;
            }
            if start.elapsed() > WAIT {
                panic!("{} did not exit within {WAIT:?}", self.children[i].0);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        for (name, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
            if failed {
                let log = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("---- {name} log (last lines) ----");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits for the scheduler file; every read of it must be complete JSON
/// (it is written to a temporary name and renamed). Returns the address.
async fn read_scheduler_file(path: &Path) -> String {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("scheduler file is not complete JSON ({e}): {text:?}"));
            assert_eq!(v["type"], "Scheduler", "{v}");
            return v["address"].as_str().unwrap_or_else(|| panic!("no \"address\" in {v}")).to_string();
        }
        assert!(start.elapsed() < WAIT, "scheduler did not write {}", path.display());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn start_scheduler(procs: &mut Procs, bin: &Path) -> (usize, PathBuf, String) {
    let file = procs.dir.join("scheduler.json");
    let i = procs.spawn("scheduler", bin, &["--host", "127.0.0.1", "--port", "0", "--scheduler-file", file.to_str().unwrap()]);
    let address = read_scheduler_file(&file).await;
    (i, file, address)
}

async fn connect(address: &str) -> Client {
    tokio::time::timeout(WAIT, Client::connect(address, None, WAIT)).await.expect("connect hung").expect("client connects")
}

async fn root_value(client: &Client, graph: graphs::Graph) -> u64 {
    let root = graph.root.clone();
    client.submit(graph.tasks).unwrap();
    let v = tokio::time::timeout(WAIT, client.gather(std::slice::from_ref(&root))).await.expect("gather hung").unwrap();
    client.release(&[root]).unwrap();
    u64::from_le_bytes(v[0][0][..8].try_into().unwrap())
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_file_serves_workers_and_sigterm_stops_everything_cleanly() {
    let Some((sched_bin, worker_bin)) = binaries() else { return };
    let mut procs = Procs::new("sigterm");
    let (sched, file, address) = start_scheduler(&mut procs, &sched_bin).await;
    assert!(address.starts_with("tcp://127.0.0.1:") && !address.ends_with(":0"), "{address}");
    // Only the file itself: the temporary it was written to was renamed.
    let mut names: Vec<String> =
        std::fs::read_dir(&procs.dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["scheduler.json", "scheduler.log"]);

    let workers = procs.spawn("workers", &worker_bin, &["--scheduler-file", file.to_str().unwrap(), "--nworkers", "2"]);
    let client = connect(&address).await;
    let info = client.wait_for_workers(2, WAIT).await.unwrap();
    // Both worker runtimes live in the one worker process.
    let pid = procs.pid(workers);
    for w in &info.workers {
        assert!(w.name.contains(&format!("-{pid}-")), "{} is not from process {pid}", w.name);
    }
    assert_eq!(root_value(&client, graphs::tree(6, "")).await, 127);
    assert_eq!(root_value(&client, graphs::shuffle(6, "")).await, 43);
    client.close().await;

    procs.signal(sched, libc::SIGTERM);
    let status = procs.wait_exit(sched).await;
    assert!(status.success(), "scheduler exited with {status}");
    assert!(!file.exists(), "the scheduler file must be removed on a clean exit");
    // The scheduler told the workers to stop.
    let status = procs.wait_exit(workers).await;
    assert!(status.success(), "worker process exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_keeps_killing_workers_fails_with_killed_worker() {
    let Some((sched_bin, worker_bin)) = binaries() else { return };
    let mut procs = Procs::new("killed-worker");
    let (sched, file, address) = start_scheduler(&mut procs, &sched_bin).await;
    let workers: Vec<usize> = (0..6)
        .map(|i| procs.spawn(&format!("worker-{i}"), &worker_bin, &["--scheduler-file", file.to_str().unwrap(), "--nworkers", "1"]))
        .collect();
    let client = connect(&address).await;
    client.wait_for_workers(6, WAIT).await.unwrap();

    // The null executor exits the process (code 17) when it runs this task.
    let crash = NullTask { crash: true, ..Default::default() }.encode();
    client.submit(vec![TaskDef::new("crasher", vec![]).with_payload(crash).wanted()]).unwrap();
    match tokio::time::timeout(WAIT, client.wait(&["crasher".to_string()])).await.expect("wait hung") {
        Err(ClientError::TaskFailed { key, failed_key, message, .. }) => {
            assert_eq!((key.as_str(), failed_key.as_str()), ("crasher", "crasher"));
            assert!(message.contains("KilledWorker"), "{message}");
        }
        other => panic!("expected TaskFailed(KilledWorker), got {other:?}"),
    }
    // Allowed failures are 3, as in Dask: the task errs when a fourth worker
    // dies while it is known to run there. It exits within microseconds of
    // its start, so its first death usually comes before its worker could
    // report it running (the report is a 10 ms sweep); every later run is
    // careful and confirms its start first. So 4 or 5 workers died, each by
    // running the task, and the others live.
    let start = Instant::now();
    let dead = loop {
        let dead: Vec<(usize, ExitStatus)> = workers.iter().filter_map(|&i| procs.exited(i).map(|s| (i, s))).collect();
        if dead.len() >= 4 || start.elapsed() > WAIT {
            tokio::time::sleep(Duration::from_millis(300)).await;
            break workers.iter().filter_map(|&i| procs.exited(i).map(|s| (i, s))).collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!((4..=5).contains(&dead.len()), "{dead:?}");
    for (_, s) in &dead {
        assert_eq!(s.code(), Some(17), "a crashed worker exits with the null task's code");
    }
    let info = client.cluster_info().await.unwrap();
    assert_eq!(info.workers.len(), 6 - dead.len(), "{info:?}");
    assert_eq!(info.failed, 1);

    // The survivor still computes.
    client.release(&["crasher".to_string()]).unwrap();
    assert_eq!(root_value(&client, graphs::tree(4, "after-")).await, 31);
    client.close().await;

    procs.signal(sched, libc::SIGTERM);
    assert!(procs.wait_exit(sched).await.success());
    for survivor in workers.iter().filter(|i| !dead.iter().any(|(d, _)| d == *i)) {
        assert!(procs.wait_exit(*survivor).await.success());
    }
}
