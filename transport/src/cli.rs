//! The transport flags the Rust binaries share (`rdask-scheduler`,
//! `rdask-worker`): `--protocol`, `--interface` and the TLS files. Cargo
//! feature `cli` (clap).

use std::path::PathBuf;

use crate::tls::TlsFiles;

#[derive(clap::Args, Debug, Clone)]
pub struct NetFlags {
    /// tcp, tls (the default with --tls-cert), ucx, or auto (ucx where
    /// available, else tcp). A worker's default: its scheduler address's.
    #[arg(long)]
    pub protocol: Option<String>,
    /// Network interface whose IPv4 address to listen on (e.g. ib0, eth0, lo).
    #[arg(long)]
    pub interface: Option<String>,
    /// CA certificate(s) of the cluster (PEM); with --tls-cert this process listens on tls://.
    #[arg(long)]
    pub tls_ca_file: Option<PathBuf>,
    /// This process's certificate (PEM).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM), if not in --tls-cert.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
}

impl NetFlags {
    /// Sets this process's TLS identity from the flags, then returns the
    /// scheme to listen with (`--protocol`, else `default_protocol`, else
    /// TLS or TCP) and the host (`--interface`'s address, else `host`).
    /// Errors are one line for the user.
    pub fn apply(&self, default_protocol: Option<&str>, host: &str) -> Result<(&'static str, String), String> {
        let tls = TlsFiles::from_flags(self.tls_ca_file.clone(), self.tls_cert.clone(), self.tls_key.clone()).map_err(|e| e.to_string())?;
        crate::tls::configure(tls.as_ref(), false).map_err(|e| e.to_string())?;
        let scheme = crate::choose_scheme(self.protocol.as_deref().or(default_protocol), tls.is_some())?;
        let host = match &self.interface {
            Some(name) => crate::netif::interface_ip(name).ok_or_else(|| format!("no IPv4 address on network interface {name:?}"))?.to_string(),
            None => host.to_string(),
        };
        Ok((scheme, host))
    }
}
