//! TLS for this process (`rdask.Security`): the identity every `tls://`
//! connection of the process uses, and throw-away certificates.

use pyo3::prelude::*;
use rdask_transport::tls::{configure, temporary_identity, TlsFiles};

use crate::RdaskError;

/// Sets this process's TLS identity (all three files, or none to remove it)
/// and whether plain `tcp://` is refused. Raises naming the file at fault.
#[pyfunction]
#[pyo3(signature = (ca_file=None, cert=None, key=None, require_encryption=false))]
pub fn configure_tls(ca_file: Option<std::path::PathBuf>, cert: Option<std::path::PathBuf>, key: Option<std::path::PathBuf>, require_encryption: bool) -> PyResult<()> {
    let files = match (ca_file, cert, key) {
        (Some(ca_file), Some(cert), key) => Some(TlsFiles { ca_file, key: key.unwrap_or_else(|| cert.clone()), cert }),
        (None, None, None) => None,
        _ => return Err(RdaskError::new_err("TLS needs a CA file and a certificate (and its key, unless the certificate file holds it)")),
    };
    configure(files.as_ref(), require_encryption).map_err(|e| RdaskError::new_err(e.to_string()))
}

/// Writes a new CA and certificate into `dir`: (ca_file, cert, key).
#[pyfunction]
pub fn temporary_tls(dir: std::path::PathBuf) -> PyResult<(String, String, String)> {
    let f = temporary_identity(&dir).map_err(|e| RdaskError::new_err(e.to_string()))?;
    let s = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    Ok((s(f.ca_file), s(f.cert), s(f.key)))
}
