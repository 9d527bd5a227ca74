//! The cluster's certificate authority, the certificates it issues, and where they live.
//!
//! Every link (control plane to shim, shim to shim) is mutual TLS with certificates of one
//! cluster CA, which Spore makes itself (`spore cluster init`, or the first `spore serve
//! --link-listen`). Names say who holds a certificate:
//!
//! - the control plane's: DNS name [`CONTROL_NAME`], made afresh (key included) at each start
//!   of `spore serve` and kept in memory only;
//! - a unit's: DNS name `unit-N.spore` ([`unit_name`]), issued when its shim joins with a
//!   token; its key is made on the shim and never leaves it (the shim sends a CSR).
//!
//! Files, under the data dir (the directory 0700, keys 0600, written atomically):
//!
//! ```text
//! control plane  <data>/cluster/ca.pem        the CA certificate
//!                <data>/cluster/ca-key.pem    the CA key (0600)
//!                <data>/cluster/tokens/ID.json  join tokens, hashed (0600; see `tokens`)
//!                <data>/cluster/issued.log    one JSON line per unit certificate issued
//! shim           <data>/cluster/ca.pem        the CA certificate (pinned by the token)
//!                <data>/cluster/unit.pem      the unit's certificate
//!                <data>/cluster/unit-key.pem  the unit's key (0600)
//! ```

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

/// The DNS name in the control plane's certificate (what shims check, whatever address they
/// dialed).
pub const CONTROL_NAME: &str = "control.spore";
/// How long the CA is valid.
const CA_DAYS: u64 = 3650;
/// How long a unit's certificate is valid (a shim renews it by joining again).
pub const UNIT_DAYS: u64 = 730;
/// How long the control plane's certificate is valid (it is made at every start).
const CONTROL_DAYS: u64 = 30;

/// The DNS name in unit `id`'s certificate.
pub fn unit_name(id: u32) -> String {
    format!("unit-{id}.spore")
}

/// A problem with the cluster's keys, certificates or their files.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file or directory could not be read or written.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No CA in the data dir.
    #[error("no cluster CA in {}: run `spore cluster init` there (or start `spore serve --link-listen` with that data dir)", .0.display())]
    NoCa(PathBuf),
    /// A file that does not hold what it should.
    #[error("{}: {why}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Making or signing a certificate failed.
    #[error("making a certificate")]
    Cert(#[from] rcgen::Error),
    /// A certificate signing request that does not parse or whose signature is wrong.
    #[error("a certificate signing request that does not verify")]
    BadCsr(#[source] rcgen::Error),
    /// rustls refused a key or certificate.
    #[error("setting up TLS")]
    Tls(#[from] rustls::Error),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// `<data>/cluster`, created 0700 (and made 0700 if it was wider).
pub fn cluster_dir(data_dir: &Path) -> Result<PathBuf, PkiError> {
    let dir = data_dir.join("cluster");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io("creating", &dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io("setting the mode of", &dir))?;
    Ok(dir)
}

/// Writes `bytes` to `path` with `mode`, atomically (a temporary file renamed over it).
pub(crate) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming to", path))
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io("reading", path))
}

/// Random bytes from the TLS library's generator.
pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut b)
        .expect("the system's random generator works");
    b
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a certificate (DER): what a join token pins.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(der).into()
}

fn validity(params: &mut CertificateParams, days: u64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back, for clocks a little behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days as i64);
    let mut serial = random::<16>();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
}

fn leaf_params(name: &str, days: u64) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(vec![name.to_owned()])?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Units are TLS servers (neighbour links) and clients (every link they dial).
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, days);
    Ok(p)
}

/// A certificate chain and its key: what one side of a link presents.
#[derive(Debug)]
pub struct Identity {
    /// The certificate, then the CA's.
    pub chain: Vec<CertificateDer<'static>>,
    /// The key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// The cluster CA, as the control plane holds it (certificate and key).
pub struct ClusterCa {
    dir: PathBuf,
    cert_pem: String,
    cert: CertificateDer<'static>,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("dir", &self.dir)
            .field("fingerprint", &self.fingerprint_hex())
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// The CA in `data_dir`, made there first if there is none; true if it was just made.
    pub fn init(data_dir: &Path) -> Result<(ClusterCa, bool), PkiError> {
        let dir = cluster_dir(data_dir)?;
        if dir.join("ca-key.pem").exists() {
            return Ok((ClusterCa::load(data_dir)?, false));
        }
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let id = hex(&random::<4>());
        p.distinguished_name
            .push(DnType::CommonName, format!("Spore cluster CA {id}"));
        p.distinguished_name.push(DnType::OrganizationName, "Spore");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut p, CA_DAYS);
        let cert = p.self_signed(&key)?;
        // The key first: a certificate without its key would be taken for a CA.
        write_file(
            &dir.join("ca-key.pem"),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_file(&dir.join("ca.pem"), cert.pem().as_bytes(), 0o644)?;
        Ok((ClusterCa::load(data_dir)?, true))
    }

    /// The CA in `data_dir`.
    pub fn load(data_dir: &Path) -> Result<ClusterCa, PkiError> {
        let dir = data_dir.join("cluster");
        let key_path = dir.join("ca-key.pem");
        if !key_path.exists() {
            return Err(PkiError::NoCa(data_dir.to_owned()));
        }
        let mode = std::fs::metadata(&key_path)
            .map_err(io("reading", &key_path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(PkiError::Malformed {
                path: key_path,
                why: format!(
                    "the CA key is readable by others (mode {:o}): chmod 600 it",
                    mode & 0o777
                ),
            });
        }
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| PkiError::Malformed {
            path: key_path.clone(),
            why: e.to_string(),
        })?;
        let cert_path = dir.join("ca.pem");
        let cert_pem = read(&cert_path)?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
            PkiError::Malformed {
                path: cert_path,
                why: e.to_string(),
            }
        })?;
        Ok(ClusterCa {
            dir,
            cert_pem,
            cert,
            key,
        })
    }

    /// `<data>/cluster`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate (DER).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// SHA-256 of the CA certificate.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.cert)
    }

    /// The fingerprint in hex.
    pub fn fingerprint_hex(&self) -> String {
        hex(&self.fingerprint())
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, PkiError> {
        Ok(Issuer::from_ca_cert_der(&self.cert, &self.key)?)
    }

    /// A fresh key and certificate for the control plane ([`CONTROL_NAME`]).
    pub fn control_identity(&self) -> Result<Identity, PkiError> {
        let key = KeyPair::generate()?;
        let cert = leaf_params(CONTROL_NAME, CONTROL_DAYS)?.signed_by(&key, &self.issuer()?)?;
        Ok(Identity {
            chain: vec![cert.der().clone(), self.cert.clone()],
            key: PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| PkiError::Malformed {
                path: self.dir.clone(),
                why: e.to_owned(),
            })?,
        })
    }

    /// Signs unit `unit`'s certificate for the key of `csr_pem` (whose signature is checked;
    /// nothing else of the request is used: the name, usages and validity are the CA's).
    pub fn sign_unit(&self, unit: u32, csr_pem: &str) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
        let cert = leaf_params(&unit_name(unit), UNIT_DAYS)?
            .signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(cert.pem())
    }
}

/// A new key for unit `unit` and a certificate signing request for it (PEM): the key stays
/// with the shim, the request goes to the control plane.
pub fn unit_key(unit: u32) -> Result<(KeyPair, String), PkiError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::new(vec![unit_name(unit)])?
        .serialize_request(&key)?
        .pem()?;
    Ok((key, csr))
}

/// The unit a certificate (DER) names (`unit-N.spore`), if it names one.
pub fn unit_of(cert: &[u8]) -> Option<u32> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = c.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => d
            .strip_prefix("unit-")?
            .strip_suffix(".spore")?
            .parse()
            .ok()
            .filter(|s: &u32| unit_name(*s) == *d),
        _ => None,
    })
}

/// When a certificate (DER) expires, if it parses.
pub fn not_after(cert: &[u8]) -> Option<SystemTime> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    let t = c.validity().not_after.timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).ok()?))
}

/// A unit's credentials as its shim keeps them: its certificate and key, and the CA's.
#[derive(Debug, Clone)]
pub struct UnitCredentials {
    /// The unit the certificate names.
    pub unit: u32,
    /// Its certificate (and the CA's) and key.
    pub identity: Identity,
    /// The CA certificate.
    pub ca: CertificateDer<'static>,
}

impl UnitCredentials {
    /// The credentials stored in `data_dir`, if there are any.
    pub fn load(data_dir: &Path) -> Result<Option<UnitCredentials>, PkiError> {
        let dir = data_dir.join("cluster");
        let (cert_path, key_path, ca_path) = (
            dir.join("unit.pem"),
            dir.join("unit-key.pem"),
            dir.join("ca.pem"),
        );
        if !cert_path.exists() || !key_path.exists() {
            return Ok(None);
        }
        let bad = |path: &Path| {
            let path = path.to_owned();
            move |e: rustls::pki_types::pem::Error| PkiError::Malformed {
                path,
                why: e.to_string(),
            }
        };
        let cert = CertificateDer::from_pem_slice(read(&cert_path)?.as_bytes())
            .map_err(bad(&cert_path))?;
        let key =
            PrivateKeyDer::from_pem_slice(read(&key_path)?.as_bytes()).map_err(bad(&key_path))?;
        let ca =
            CertificateDer::from_pem_slice(read(&ca_path)?.as_bytes()).map_err(bad(&ca_path))?;
        let unit = unit_of(&cert).ok_or_else(|| PkiError::Malformed {
            path: cert_path.clone(),
            why: "the certificate names no unit".into(),
        })?;
        Ok(Some(UnitCredentials {
            unit,
            identity: Identity {
                chain: vec![cert, ca.clone()],
                key,
            },
            ca,
        }))
    }

    /// Stores what a join brought: the shim's key, its certificate and the CA's (PEM).
    pub fn store(
        data_dir: &Path,
        key: &KeyPair,
        cert_pem: &str,
        ca_pem: &str,
    ) -> Result<UnitCredentials, PkiError> {
        let dir = cluster_dir(data_dir)?;
        write_file(
            &dir.join("unit-key.pem"),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_file(&dir.join("unit.pem"), cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
        UnitCredentials::load(data_dir)?.ok_or_else(|| PkiError::Malformed {
            path: dir,
            why: "the credentials just written are not there".into(),
        })
    }

    /// SHA-256 of the CA certificate these credentials chain to.
    pub fn ca_fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.ca)
    }

    /// When the unit's certificate expires.
    pub fn not_after(&self) -> Option<SystemTime> {
        not_after(&self.identity.chain[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_is_made_once_with_private_modes_and_signs_unit_certificates() {
        let tmp = tempfile::tempdir().unwrap();
        let (ca, made) = ClusterCa::init(tmp.path()).unwrap();
        assert!(made);
        let (again, made) = ClusterCa::init(tmp.path()).unwrap();
        assert!(!made);
        assert_eq!(ca.fingerprint(), again.fingerprint());
        let mode = |p: &str| {
            std::fs::metadata(tmp.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("cluster"), 0o700);
        assert_eq!(mode("cluster/ca-key.pem"), 0o600);

        let (key, csr) = unit_key(7).unwrap();
        let pem = ca.sign_unit(7, &csr).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(unit_of(&der), Some(7));
        let left = not_after(&der)
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(
            left > Duration::from_secs((UNIT_DAYS - 1) * 86_400),
            "{left:?}"
        );
        // The control plane's certificate names no unit.
        let control = ca.control_identity().unwrap();
        assert_eq!(unit_of(&control.chain[0]), None);

        let shim = tempfile::tempdir().unwrap();
        let creds = UnitCredentials::store(shim.path(), &key, &pem, ca.cert_pem()).unwrap();
        assert_eq!(creds.unit, 7);
        assert_eq!(creds.ca_fingerprint(), ca.fingerprint());
        let m = std::fs::metadata(shim.path().join("cluster/unit-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, 0o600);

        // A request whose signature does not match its key is refused.
        let mut bad = csr.into_bytes();
        let i = bad.len() / 2;
        bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
        assert!(ca.sign_unit(7, &String::from_utf8(bad).unwrap()).is_err());

        // A CA key others can read is refused.
        std::fs::set_permissions(
            tmp.path().join("cluster/ca-key.pem"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e = ClusterCa::load(tmp.path()).unwrap_err();
        assert!(e.to_string().contains("readable by others"), "{e}");
    }
}
