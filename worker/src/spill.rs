//! Values on disk: the worker's spill directory. One file per value, named
//! by task id: a header (magic, frame count, frame lengths) and the frames
//! back to back. Reading maps the file privately and hands out slices of the
//! mapping as frames, so a spilled numpy array comes back without a copy
//! through a user-space buffer (the pages come from the page cache on first
//! touch), and the file is unlinked at once: the mapping keeps the data.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rdask_transport::bytes::Bytes;
use rdask_transport::TaskId;

use crate::executor::Frames;

const MAGIC: &[u8; 8] = b"RDSPILL1";

/// Where one spilled value lives.
#[derive(Debug, Clone)]
pub struct OnDisk {
    pub path: PathBuf,
    /// Bytes of the frames (the value's size on disk, header excluded).
    pub bytes: u64,
}

/// The worker's spill directory: created on first use, removed (with what is
/// left in it) when dropped.
#[derive(Debug)]
pub struct SpillDir {
    root: PathBuf,
    created: std::sync::OnceLock<std::io::Result<()>>,
    /// Makes every file name new: a file is never rewritten in place, so a
    /// mapping a reader still holds never sees its file truncated (SIGBUS).
    seq: std::sync::atomic::AtomicU64,
}

impl SpillDir {
    /// `parent`: `--local-directory`, or the system's temporary directory.
    /// The worker's own folder inside it is unique to the process and name,
    /// so workers sharing a local directory never touch each other's files.
    pub fn new(parent: Option<&Path>, worker_name: &str) -> SpillDir {
        let parent = parent.map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
        let safe: String = worker_name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        let root = parent.join(format!("rdask-spill-{safe}-{}", std::process::id()));
        SpillDir { root, created: std::sync::OnceLock::new(), seq: Default::default() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    fn ensure(&self) -> std::io::Result<()> {
        match self.created.get_or_init(|| std::fs::create_dir_all(&self.root)) {
            Ok(()) => Ok(()),
            Err(e) => Err(std::io::Error::new(e.kind(), format!("cannot create spill directory {}: {e}", self.root.display()))),
        }
    }

    /// Writes a value's frames. On error (a full disk, a read-only
    /// directory) nothing is left behind and the caller keeps the value in
    /// memory.
    pub fn write(&self, id: TaskId, frames: &[Bytes]) -> std::io::Result<OnDisk> {
        self.ensure()?;
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.root.join(format!("{id}-{seq}"));
        let result = (|| {
            let file = File::create(&path)?;
            let mut w = BufWriter::with_capacity(64 << 10, file);
            w.write_all(MAGIC)?;
            w.write_all(&(frames.len() as u64).to_le_bytes())?;
            for f in frames {
                w.write_all(&(f.len() as u64).to_le_bytes())?;
            }
            for f in frames {
                w.write_all(f)?;
            }
            // A full disk shows up here, at write or flush (the file
            // system reserves the blocks when it takes the data), before the
            // value leaves memory. No fsync: the file only needs to outlive
            // the process's own use of it, and the page cache is not the
            // process's memory.
            w.into_inner().map_err(|e| e.into_error())?;
            Ok(OnDisk { path: path.clone(), bytes: frames.iter().map(|f| f.len() as u64).sum() })
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    /// Reads a value's frames. With `consume` the file is unlinked (the
    /// value moves back to memory); without, it stays (a peer is served).
    pub fn read(disk: &OnDisk, consume: bool) -> std::io::Result<Frames> {
        let file = File::open(&disk.path)?;
        let len = file.metadata()?.len();
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("spill file {}: {what}", disk.path.display()));
        if len < 16 {
            return Err(bad("too short"));
        }
        // SAFETY: the file is private to this worker (its own directory, a
        // name only the store hands out) and not written while mapped; a
        // private (copy-on-write) mapping is not affected by later unlinking.
        let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file)? };
        if consume {
            let _ = std::fs::remove_file(&disk.path);
        }
        let all = Bytes::from_owner(map);
        if &all[..8] != MAGIC {
            return Err(bad("not a spill file"));
        }
        let word = |at: usize| -> std::io::Result<u64> {
            all.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap())).ok_or_else(|| bad("truncated header"))
        };
        let n = word(8)? as usize;
        let mut at = 16usize.checked_add(n.checked_mul(8).ok_or_else(|| bad("bad frame count"))?).ok_or_else(|| bad("bad frame count"))?;
        let mut frames = Frames::with_capacity(n);
        for i in 0..n {
            let flen = word(16 + 8 * i)? as usize;
            let end = at.checked_add(flen).filter(|&e| e as u64 <= len).ok_or_else(|| bad("truncated frames"))?;
            frames.push(all.slice(at..end));
            at = end;
        }
        Ok(frames)
    }

    pub fn remove(disk: &OnDisk) {
        let _ = std::fs::remove_file(&disk.path);
    }
}

impl Drop for SpillDir {
    fn drop(&mut self) {
        if matches!(self.created.get(), Some(Ok(()))) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_back_as_written_and_consume_unlinks() {
        let tmp = std::env::temp_dir().join(format!("rdask-spill-test-{}", std::process::id()));
        let dir = SpillDir::new(Some(&tmp), "w/1");
        let frames = vec![Bytes::from_static(b"header"), Bytes::from(vec![7u8; 100_000]), Bytes::new()];
        let disk = dir.write(TaskId::new(42), &frames).unwrap();
        assert_eq!(disk.bytes, 100_006);
        let back = SpillDir::read(&disk, false).unwrap();
        assert_eq!(back.to_vec(), frames);
        assert!(disk.path.exists(), "a peer read keeps the file");
        let back = SpillDir::read(&disk, true).unwrap();
        assert!(!disk.path.exists(), "a read that moves the value back unlinks the file");
        assert_eq!(back[1].len(), 100_000);
        assert!(back[1].iter().all(|&b| b == 7), "the mapping outlives the unlink");
        drop(dir);
        assert!(!tmp.join(format!("rdask-spill-w_1-{}", std::process::id())).exists(), "the spill folder goes with the worker");
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn an_unwritable_directory_is_an_error_and_leaves_nothing() {
        // A file where the directory should be: creating it fails.
        let blocker = std::env::temp_dir().join(format!("rdask-spill-blocker-{}", std::process::id()));
        std::fs::write(&blocker, b"x").unwrap();
        let dir = SpillDir::new(Some(&blocker), "w");
        let err = dir.write(TaskId::new(1), &[Bytes::from_static(b"v")]).unwrap_err();
        assert!(err.to_string().contains("cannot create spill directory"), "{err}");
        let _ = std::fs::remove_file(&blocker);
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_panic() {
        let tmp = std::env::temp_dir().join(format!("rdask-spill-corrupt-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        for content in [&b"short"[..], b"RDSPILL1\xff\xff\xff\xff\xff\xff\xff\x7f", b"RDSPILL1\x01\0\0\0\0\0\0\0\x10\0\0\0\0\0\0\0abc", b"NOTSPILL\0\0\0\0\0\0\0\0"] {
            let path = tmp.join("f");
            std::fs::write(&path, content).unwrap();
            assert!(SpillDir::read(&OnDisk { path, bytes: 0 }, false).is_err());
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
