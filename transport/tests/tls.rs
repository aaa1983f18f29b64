//! The TLS backend with mutual authentication. The TLS identity is
//! process-wide, so everything runs in one test (this file is its own
//! process); a listener keeps the identity it was started with, which lets
//! one process play a server and then clients with other identities.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
use rdask_transport::bytes::Bytes;
use rdask_transport::protocol::{FromPeerMessage, WireMessage};
use rdask_transport::tls::{configure, TlsFiles};
use rdask_transport::{connect, listen, Frame, Limits};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn make_ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    Ca { cert: p.self_signed(&key).unwrap(), key }
}

/// A certificate for both ends (server and client use), signed by `ca`,
/// written with the CA as PEM files in `dir`.
fn identity(dir: &Path, tag: &str, ca: &Ca, trust: &Ca) -> TlsFiles {
    let mut p = CertificateParams::new(vec!["rdask-node".to_string()]).unwrap();
    p.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let files = TlsFiles { ca_file: dir.join(format!("{tag}-ca.pem")), cert: dir.join(format!("{tag}.pem")), key: dir.join(format!("{tag}.key")) };
    std::fs::write(&files.ca_file, trust.cert.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

fn frame(payload: &[u8]) -> Frame {
    let msg = FromPeerMessage::Data { request_id: 7, items: vec![], more: false };
    Frame::with_data(&msg, vec![Bytes::copy_from_slice(payload)])
}

/// Connects and round-trips one frame through the echo server.
async fn echo(addr: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut conn = connect(addr, Limits::default()).await.map_err(|e| e.to_string())?;
    conn.sender.send(frame(payload)).map_err(|e| e.to_string())?;
    match conn.receiver.recv().await {
        Ok(Some(f)) => {
            FromPeerMessage::access(&f.control).map_err(|e| e.to_string())?;
            Ok(f.data[0].to_vec())
        }
        Ok(None) => Err("closed".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_accepts_the_cluster_ca_and_refuses_everything_else() {
    let dir = std::env::temp_dir().join(format!("rdask-tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, other) = (make_ca("rdask test CA"), make_ca("another CA"));
    let good = identity(&dir, "good", &ca, &ca);
    let foreign_cert = identity(&dir, "foreign", &other, &ca); // trusts our CA, signed by another
    let foreign = identity(&dir, "stranger", &other, &other);

    // Without an identity, tls:// says what is missing.
    configure(None, false).unwrap();
    let err = listen("tls://127.0.0.1:0", Limits::default()).await.err().unwrap().to_string();
    assert!(err.contains("--tls-ca-file"), "{err}");

    configure(Some(&good), false).unwrap();
    let mut listener = listen("tls://127.0.0.1:0", Limits::default()).await.unwrap();
    let addr = listener.address.clone();
    assert!(addr.starts_with("tls://127.0.0.1:"), "{addr}");
    tokio::spawn(async move {
        while let Some(mut conn) = listener.accept().await {
            tokio::spawn(async move {
                while let Ok(Some(f)) = conn.receiver.recv().await {
                    let _ = conn.sender.send(frame(&f.data[0]));
                }
            });
        }
    });

    // Same CA: a large frame goes both ways intact.
    let big: Vec<u8> = (0..(8 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(echo(&addr, &big).await.unwrap(), big);

    // A reader that starts late fills the socket, so the sender's last write
    // leaves TLS records inside rustls; they must still go out (a regression:
    // they waited for a next frame that never came, a 60 s stall).
    let mut slow = listen("tls://127.0.0.1:0", Limits::default()).await.unwrap();
    let slow_addr = slow.address.clone();
    tokio::spawn(async move {
        while let Some(mut conn) = slow.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                while let Ok(Some(f)) = conn.receiver.recv().await {
                    let _ = conn.sender.send(frame(&f.data[0]));
                }
            });
        }
    });
    for size in [8 << 20, (8 << 20) + 12_345, 3 << 20] {
        let payload = &big[..size.min(big.len())];
        let back = tokio::time::timeout(std::time::Duration::from_secs(20), echo(&slow_addr, payload)).await;
        assert_eq!(back.expect("the echo stalled").unwrap(), payload);
    }

    // A client whose certificate another CA signed is refused by the server.
    configure(Some(&foreign_cert), false).unwrap();
    let err = echo(&addr, b"hello").await.unwrap_err();
    assert!(!err.is_empty());

    // A client of another CA does not trust the server either.
    configure(Some(&foreign), false).unwrap();
    let err = echo(&addr, b"hello").await.unwrap_err();
    assert!(err.contains("TLS handshake") && err.to_lowercase().contains("issuer"), "{err}");

    // The server still serves good clients after refusing those.
    configure(Some(&good), false).unwrap();
    assert_eq!(echo(&addr, b"again").await.unwrap(), b"again");

    // require_encryption refuses plain TCP both ways.
    configure(Some(&good), true).unwrap();
    let err = listen("tcp://127.0.0.1:0", Limits::default()).await.err().unwrap().to_string();
    assert!(err.contains("encryption is required"), "{err}");
    let err = connect("tcp://127.0.0.1:1", Limits::default()).await.err().unwrap().to_string();
    assert!(err.contains("encryption is required"), "{err}");
    assert!(configure(None, true).is_err(), "require_encryption without certificates is an error");

    // Bad files are named in the error.
    let missing = TlsFiles { cert: dir.join("nope.pem"), ..good.clone() };
    let err = configure(Some(&missing), false).unwrap_err().to_string();
    assert!(err.contains("nope.pem"), "{err}");
    configure(None, false).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
