//! Device memory shared between processes of one node: the exporting
//! process describes an array's memory (a CUDA IPC handle; for the host
//! stand-in, its process id and address), and a process of the same node
//! copies it into memory of its own without the network or host memory
//! (`Device::ipc_import`). Which processes may import what another exported
//! is said by `Device::ipc_domain`: the node (its boot id) and the kind of
//! device.

/// The first bytes of every descriptor, then the kind's own layout.
pub const DESCRIPTOR_MARK: &[u8; 4] = b"RDVX";

/// This boot of this machine: processes that see the same id share a node.
/// Read once (every fetch offers it, every serve compares it).
pub fn node_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(read_node_id)
}

fn read_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            let mut name = [0u8; 256];
            // SAFETY: gethostname writes at most `name.len()` bytes.
            unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
            String::from_utf8_lossy(name.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
        })
}

/// A descriptor: the mark, then `body`.
pub fn descriptor(body: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + body.len());
    d.extend_from_slice(DESCRIPTOR_MARK);
    d.extend_from_slice(body);
    d
}

/// The body of a descriptor, if `d` is one.
pub fn body(d: &[u8]) -> Option<&[u8]> {
    d.strip_prefix(DESCRIPTOR_MARK.as_slice())
}

/// Copies `dst.len()` bytes at `address` in process `pid` into `dst`
/// (the stand-in's import: what a GPU does with an IPC handle, done with
/// `process_vm_readv`, which needs the right to trace that process).
pub fn read_other_process(pid: u32, address: u64, dst: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < dst.len() {
        let local = libc::iovec { iov_base: dst[done..].as_mut_ptr().cast(), iov_len: dst.len() - done };
        let remote = libc::iovec { iov_base: (address as usize + done) as *mut libc::c_void, iov_len: dst.len() - done };
        // SAFETY: `local` is memory we own; the kernel checks `remote`
        // against the other process's mappings.
        let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the other process's memory ended early"));
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_carry_their_body_and_others_are_refused() {
        let d = descriptor(&[1, 2, 3]);
        assert_eq!(body(&d), Some(&[1u8, 2, 3][..]));
        assert_eq!(body(b"RDV1...."), None);
        assert!(!node_id().is_empty());
    }

    #[test]
    fn the_stand_in_imports_what_it_exported() {
        use crate::device::{upload, Device, HostStandIn};
        let dev = HostStandIn::default();
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        let src = upload(&dev, &bytes).unwrap();
        // SAFETY: `src` is the stand-in's memory and outlives the import.
        let d = unsafe { dev.ipc_export(dev.address(&src), bytes.len()) }.unwrap();
        let copy = dev.ipc_import(&d, bytes.len()).unwrap();
        let mut back = dev.alloc_staging(bytes.len()).unwrap();
        dev.copy_to_host(&copy, 0, &mut back, bytes.len()).unwrap();
        assert_eq!(back.bytes(), &bytes[..]);
        assert_eq!(dev.ipc_domain(), Some(format!("standin:{}", node_id())));
        assert!(dev.ipc_import(b"RDV1 not a descriptor", 10).is_err());
        dev.free(copy);
        dev.free(src);
        assert_eq!(dev.allocated(), 0);
    }

    #[test]
    fn reading_this_process_through_the_kernel_gives_its_bytes() {
        let src: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        read_other_process(std::process::id(), src.as_ptr() as u64, &mut dst).unwrap();
        assert_eq!(src, dst);
        // Memory that is not mapped there is an error, not a crash.
        assert!(read_other_process(std::process::id(), 8, &mut dst[..16]).is_err());
    }
}
