//! Readers hammering the output files during 1,000 rotations never see a partial file, and a
//! reader that resolves `..data` once never sees a certificate with another version's key.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use slim_identity_agent::output::{DATA_LINK, FileContent, OutputDir};
use slim_identity_agent::svid::x509::{self, X509Options};
use slim_identity_agent::workload::fake::AgentState;
use slim_identity_agent::workload::pb;

const ROTATIONS: usize = 1000;

fn complete_pem(bytes: &[u8], label: &str) -> bool {
    let text = String::from_utf8_lossy(bytes);
    text.starts_with(&format!("-----BEGIN {label}-----\n")) && text.ends_with(&format!("-----END {label}-----\n"))
}

/// Does the key belong to the first certificate? (Both parsed from PEM.)
fn matching(cert_pem: &[u8], key_pem: &[u8]) -> bool {
    let der = |pem: &[u8]| -> Option<Vec<u8>> {
        use base64::Engine;
        let text = String::from_utf8_lossy(pem);
        let body: String = text.lines().skip(1).take_while(|l| !l.starts_with("-----END")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).ok()
    };
    let (Some(cert), Some(key)) = (der(cert_pem), der(key_pem)) else { return false };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&cert) else { return false };
    let Ok(key) = rcgen::KeyPair::try_from(key.as_slice()) else { return false };
    key.public_key_raw() == cert.tbs_certificate.subject_pki.subject_public_key.data.as_ref()
}

#[test]
fn readers_never_see_partial_files_or_mismatched_pairs() {
    // 20 distinct identities, cycled: enough to tell versions apart.
    let mut state = AgentState::new("example.org");
    let versions: Vec<(Vec<u8>, Vec<u8>)> = (0..20)
        .map(|_| {
            state.identities.clear();
            state.issue("spiffe://example.org/app", "");
            let i = &state.identities[0];
            let response = pb::X509svidResponse {
                svids: vec![pb::X509svid {
                    spiffe_id: i.spiffe_id.clone(),
                    x509_svid: i.chain.clone(),
                    x509_svid_key: i.key.clone(),
                    bundle: state.authority.der().to_vec(),
                    hint: String::new(),
                }],
                crl: vec![],
                federated_bundles: Default::default(),
            };
            let files = x509::render(&response, "", X509Options::default(), 0).expect("render");
            (files.svid_pem, files.key_pem)
        })
        .collect();

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_owned();
    let mut out = OutputDir::new(&path).expect("dir");
    let write = |out: &mut OutputDir, (cert, key): &(Vec<u8>, Vec<u8>)| {
        out.update([
            ("tls.crt".to_owned(), FileContent::swapped(cert.clone(), 0o644)),
            ("tls.key".to_owned(), FileContent::swapped(key.clone(), 0o600)),
        ])
        .expect("write");
    };
    write(&mut out, &versions[0]);

    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    // Snapshot readers: resolve ..data once, read both files from that version.
    for _ in 0..2 {
        let (done, reads, path) = (done.clone(), reads.clone(), path.clone());
        readers.push(std::thread::spawn(move || {
            let mut bad = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let Ok(version) = std::fs::read_link(path.join(DATA_LINK)) else { continue };
                let (cert, key) = (
                    std::fs::read(path.join(&version).join("tls.crt")),
                    std::fs::read(path.join(&version).join("tls.key")),
                );
                // A version removed under us (two swaps later) is simply gone: read again.
                let (Ok(cert), Ok(key)) = (cert, key) else { continue };
                reads.fetch_add(1, Ordering::Relaxed);
                if !complete_pem(&cert, "CERTIFICATE") || !complete_pem(&key, "PRIVATE KEY") || !matching(&cert, &key) {
                    bad.push(version.display().to_string());
                }
            }
            bad
        }));
    }
    // Plain readers: open the stable paths, as most programs do; never a partial file.
    for _ in 0..2 {
        let (done, reads, path) = (done.clone(), reads.clone(), path.clone());
        readers.push(std::thread::spawn(move || {
            let mut bad = Vec::new();
            while !done.load(Ordering::Relaxed) {
                for (name, label) in [("tls.crt", "CERTIFICATE"), ("tls.key", "PRIVATE KEY")] {
                    match std::fs::read(Path::new(&path).join(name)) {
                        Ok(bytes) => {
                            reads.fetch_add(1, Ordering::Relaxed);
                            if !complete_pem(&bytes, label) {
                                bad.push(format!("partial {name}"));
                            }
                        }
                        Err(error) => bad.push(format!("{name} missing: {error}")),
                    }
                }
            }
            bad
        }));
    }
    for rotation in 1..=ROTATIONS {
        write(&mut out, &versions[rotation % versions.len()]);
    }
    done.store(true, Ordering::Relaxed);
    let bad: Vec<String> = readers.into_iter().flat_map(|r| r.join().expect("reader")).collect();
    assert!(bad.is_empty(), "{} bad reads, e.g. {:?}", bad.len(), bad.first());
    assert_eq!(out.writes(), ROTATIONS as u64 + 1);
    assert!(reads.load(Ordering::Relaxed) > 1000, "readers actually raced the writer");
}
