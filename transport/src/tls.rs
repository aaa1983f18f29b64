//! TLS backend (`tls://host:port`): the TCP backend's framing over rustls,
//! with mutual authentication as in Dask's TLS: both ends present a
//! certificate signed by the cluster's CA, and each end verifies the other's
//! chain against that CA. Host names are not checked (Dask does not either:
//! workers are reached by IP address, and the CA is what vouches for a peer).
//!
//! The TLS identity is process-wide ([`configure`]): a scheduler, worker or
//! client process has one certificate, used when it listens and when it
//! connects, so every connection it makes (worker to worker too) is
//! protected the same way. `require_encryption` refuses plain `tcp://` in
//! both directions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::backend::{host_port, Backend, BoxFuture, Connection, Listener};
use crate::error::{Result, TransportError};
use crate::frame::Limits;
use crate::tcp::{accept_loop, bind, wrap_io};

/// A TLS handshake must finish within this time (a silent or slow peer
/// holds no more than a task and a socket meanwhile).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of a TLS identity, as Dask's `--tls-ca-file/--tls-cert/--tls-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    pub cert: PathBuf,
    /// May be the certificate file itself when it holds the key too.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The three command-line flags as one identity: none given is `None`;
    /// the key defaults to the certificate file (which may hold both).
    pub fn from_flags(ca_file: Option<PathBuf>, cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<TlsFiles>> {
        match (ca_file, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca_file), Some(cert), key) => Ok(Some(TlsFiles { key: key.unwrap_or_else(|| cert.clone()), ca_file, cert })),
            _ => Err(bad("TLS needs --tls-ca-file and --tls-cert (and --tls-key unless the certificate file holds the key)".into())),
        }
    }
}

struct TlsState {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

#[derive(Default)]
struct Settings {
    tls: Option<Arc<TlsState>>,
    require_encryption: bool,
}

static SETTINGS: RwLock<Settings> = RwLock::new(Settings { tls: None, require_encryption: false });

fn bad(what: String) -> TransportError {
    TransportError::Tls(what)
}

/// Sets this process's TLS identity (`None` removes it) and whether plain
/// TCP is refused. Fails with a message naming the file that is wrong.
pub fn configure(files: Option<&TlsFiles>, require_encryption: bool) -> Result<()> {
    let tls = match files {
        Some(f) => Some(Arc::new(build(f)?)),
        None => None,
    };
    if require_encryption && tls.is_none() {
        return Err(bad("require_encryption needs a TLS certificate, key and CA file".into()));
    }
    let mut s = SETTINGS.write().unwrap();
    s.tls = tls;
    s.require_encryption = require_encryption;
    Ok(())
}

/// Whether a TLS identity is set.
pub fn is_configured() -> bool {
    SETTINGS.read().unwrap().tls.is_some()
}

/// Refuses a plain `tcp://` address when encryption is required.
pub(crate) fn check_plain_allowed(addr: &str) -> Result<()> {
    if SETTINGS.read().unwrap().require_encryption {
        return Err(bad(format!("{addr}: encryption is required (require_encryption), so plain tcp:// is refused; use tls://")));
    }
    Ok(())
}

fn state(addr: &str) -> Result<Arc<TlsState>> {
    SETTINGS.read().unwrap().tls.clone().ok_or_else(|| {
        bad(format!("{addr} needs TLS certificates: pass --tls-ca-file, --tls-cert and --tls-key (or rdask.Security(...))"))
    })
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: std::result::Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("cannot read {what} {}: {e}", path.display())))?
        .collect();
    let certs = certs.map_err(|e| bad(format!("cannot parse {what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(bad(format!("{what} {} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

fn build(f: &TlsFiles) -> Result<TlsState> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(&f.ca_file, "CA file")? {
        roots.add(ca).map_err(|e| bad(format!("CA file {}: {e}", f.ca_file.display())))?;
    }
    let roots = Arc::new(roots);
    let chain = read_certs(&f.cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(&f.key).map_err(|e| bad(format!("cannot read private key {}: {e}", f.key.display())))?;

    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| bad(format!("CA file {}: {e}", f.ca_file.display())))?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| bad(format!("certificate {} and key {} do not make an identity: {e}", f.cert.display(), f.key.display())))?;

    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| bad(format!("CA file {}: {e}", f.ca_file.display())))?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CaOnly(inner)))
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(format!("certificate {} and key {} do not make an identity: {e}", f.cert.display(), f.key.display())))?;
    Ok(TlsState { acceptor: TlsAcceptor::from(Arc::new(server)), connector: TlsConnector::from(Arc::new(client)) })
}

/// Verifies the server's chain against the CA, but not its host name.
#[derive(Debug)]
struct CaOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for CaOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

pub struct TlsBackend;

impl Backend for TlsBackend {
    fn scheme(&self) -> &'static str {
        "tls"
    }

    fn listen<'a>(&'a self, addr: &'a str, limits: Limits) -> BoxFuture<'a, Result<Listener>> {
        Box::pin(async move {
            let tls = state(addr)?;
            let (listener, bound, local) = bind(host_port(addr, "tls")?).await?;
            let (tx, rx) = tokio::sync::mpsc::channel(256);
            let closed = tx.clone();
            tokio::spawn(accept_loop(listener, async move { closed.closed().await }, move |stream, peer| {
                let (tx, acceptor) = (tx.clone(), tls.acceptor.clone());
                async move {
                    let open = !tx.is_closed();
                    // Each handshake in its own task: a slow client must not
                    // hold up the next one.
                    tokio::spawn(async move {
                        let _ = stream.set_nodelay(true);
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => {
                                let (read, write) = tokio::io::split(tls);
                                let _ = tx.send(wrap_io(read, write, peer, limits)).await;
                            }
                            Ok(Err(e)) => tracing::warn!(%peer, "TLS handshake refused: {e}"),
                            Err(_) => tracing::warn!(%peer, "TLS handshake timed out after {TLS_HANDSHAKE_TIMEOUT:?}"),
                        }
                    });
                    open
                }
            }));
            Ok(Listener::new(format!("tls://{local}"), rx, None).bound_to(format!("tls://{bound}")))
        })
    }

    fn connect<'a>(&'a self, addr: &'a str, limits: Limits) -> BoxFuture<'a, Result<Connection>> {
        Box::pin(async move {
            let tls = state(addr)?;
            let hp = host_port(addr, "tls")?;
            let host = hp.rsplit_once(':').map_or(hp, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(host.to_string()).map_err(|e| TransportError::InvalidAddress(addr.to_string(), e.to_string()))?;
            let stream = tokio::net::TcpStream::connect(hp).await?;
            let _ = stream.set_nodelay(true);
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.connector.connect(name, stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(bad(format!("TLS handshake with {addr} failed: {e}"))),
                Err(_) => return Err(bad(format!("TLS handshake with {addr} timed out after {TLS_HANDSHAKE_TIMEOUT:?}"))),
            };
            let (read, write) = tokio::io::split(tls);
            Ok(wrap_io(read, write, addr.to_string(), limits))
        })
    }
}

/// Writes a new CA and one certificate it signed (usable by servers and
/// clients alike) into `dir`: what Dask's `Security.temporary()` makes, for
/// a cluster whose processes all see `dir` (a local cluster, a benchmark).
#[cfg(feature = "tls-gen")]
pub fn temporary_identity(dir: &Path) -> Result<TlsFiles> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let gen = |e: rcgen::Error| bad(format!("cannot make a temporary certificate: {e}"));
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.distinguished_name.push(DnType::CommonName, "rdask temporary CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().map_err(gen)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;
    let mut leaf = CertificateParams::new(vec!["rdask".to_string()]).map_err(gen)?;
    leaf.distinguished_name.push(DnType::CommonName, "rdask");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().map_err(gen)?;
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).map_err(gen)?;
    std::fs::create_dir_all(dir)?;
    let files = TlsFiles { ca_file: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
    std::fs::write(&files.ca_file, ca_cert.pem())?;
    std::fs::write(&files.cert, cert.pem())?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    std::io::Write::write_all(&mut opts.open(&files.key)?, key.serialize_pem().as_bytes())?;
    Ok(files)
}
