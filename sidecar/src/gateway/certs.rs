//! The certificates of the gateway's TLS ports, picked per SNI and
//! reloaded without a restart.
//!
//! Three sources, in the order a name is served from:
//!
//! 1. **A directory of certificates** (`--tls-cert-dir`): a group's own
//!    certificates, or several platform ones. Each `NAME.crt` with its
//!    `NAME.key`, or a `NAME.pem` holding the chain and the key. The names a
//!    certificate serves are its own (subject alternative names): the file
//!    name does not matter. A certificate that names the SNI exactly wins
//!    over one that covers it with a wildcard; between equals, the first
//!    file in name order.
//! 2. **The platform's certificate** (`--tls-cert`/`--tls-key`): the
//!    wildcard of the service domain; it is also what a client without SNI,
//!    or with a name no certificate covers, is shown.
//! 3. **Certificates the gateway makes** (`--tls-self-signed`): for a
//!    group's FQDN that no file covers, a self-signed ECDSA P-256
//!    certificate made at the first handshake and kept in memory
//!    (development and tests: clients must be told to trust it).
//!
//! Files are read again when they change (checked every reload interval,
//! and at once on `SIGHUP`): new handshakes get the new certificate,
//! connections already open keep theirs. A pair that no longer loads (a
//! certificate renewed before its key was written, a key that does not
//! match) keeps its last good version and is logged and counted; at start,
//! it is an error that names the file.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Largest certificate or key file read (a chain of a few certificates is a
/// few KiB).
const MAX_FILE: u64 = 1 << 20;

/// Most files of the certificate directory looked at.
const MAX_DIR_FILES: usize = 10_000;

/// Most names whose choice is remembered (cleared when full and at every
/// reload), so that clients sending random SNIs cost a bounded amount.
const MAX_PICKS: usize = 4096;

/// Where the certificates come from.
#[derive(Debug, Clone, Default)]
pub struct CertSources {
    /// The platform's certificate chain and key (PEM).
    pub default: Option<(PathBuf, PathBuf)>,
    /// A directory of certificates picked by the names they hold.
    pub dir: Option<PathBuf>,
    /// Make a self-signed ECDSA P-256 certificate for a group's FQDN that
    /// no file covers.
    pub self_signed: bool,
}

impl CertSources {
    /// Whether any certificate can be served (TLS ports need one).
    pub fn any(&self) -> bool {
        self.default.is_some() || self.dir.is_some() || self.self_signed
    }
}

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CertError(String);

/// One certificate and its key, from files.
#[derive(Clone)]
struct Entry {
    /// The file of the certificate chain (what logs name).
    source: PathBuf,
    key: Arc<CertifiedKey>,
}

impl Entry {
    /// The end-entity certificate.
    fn leaf(&self) -> &CertificateDer<'static> {
        &self.key.cert[0]
    }
}

/// The certificates loaded from files, and what they were loaded from.
#[derive(Default)]
struct Loaded {
    default: Option<Entry>,
    /// The directory's, in file-name order.
    named: Vec<Entry>,
    /// Path, modification time and length of every file read.
    stamp: Vec<(PathBuf, Option<SystemTime>, u64)>,
}

/// How a certificate covers a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cover {
    /// Through a wildcard (`*.example.com` for `a.example.com`).
    Wildcard,
    /// The name itself is in the certificate.
    Exact,
}

/// A label no real name has: a certificate that covers it in place of a
/// name's first label covers that name through a wildcard.
const PROBE_LABEL: &str = "x--istmesh-wildcard-probe";

/// How the certificate `der` covers `name` (a DNS name, any case), if it
/// does.
pub fn covers(der: &CertificateDer<'_>, name: &str) -> Option<Cover> {
    let cert = webpki::EndEntityCert::try_from(der).ok()?;
    let valid = |n: &str| {
        DnsName::try_from(n.to_ascii_lowercase())
            .ok()
            .is_some_and(|d| {
                cert.verify_is_valid_for_subject_name(&ServerName::DnsName(d))
                    .is_ok()
            })
    };
    if !valid(name) {
        return None;
    }
    match name.split_once('.') {
        Some((_, rest)) if valid(&format!("{PROBE_LABEL}.{rest}")) => Some(Cover::Wildcard),
        _ => Some(Cover::Exact),
    }
}

/// Tells whether a name is a group's FQDN.
pub type GroupNames = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// Counts of reloads, for `/metrics`.
#[derive(Debug, Default)]
pub struct CertStats {
    /// Reloads that read every changed file.
    pub reloads_ok: AtomicU64,
    /// Certificate files that failed to load at the last reload (their last
    /// good version is served).
    pub failing: AtomicU64,
    /// Certificates the gateway made.
    pub made: AtomicU64,
}

/// The gateway's certificates: files, reloaded, and those it makes.
pub struct Certs {
    sources: CertSources,
    provider: Arc<CryptoProvider>,
    loaded: RwLock<Arc<Loaded>>,
    /// Chosen certificate per name (`None`: the fallback), for the current
    /// `loaded`.
    picks: Mutex<HashMap<String, Option<Arc<CertifiedKey>>>>,
    /// Self-signed certificates made, per name.
    made: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// Whether a name is a group's FQDN (set once the routes exist): the
    /// only names the gateway makes certificates for.
    group_name: OnceLock<GroupNames>,
    /// Reload counters.
    pub stats: CertStats,
}

impl fmt::Debug for Certs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self.loaded.read();
        f.debug_struct("Certs")
            .field("sources", &self.sources)
            .field("default", &l.default.as_ref().map(|e| e.source.clone()))
            .field(
                "named",
                &l.named.iter().map(|e| &e.source).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Certs {
    /// Loads every file; any file that fails is an error naming it.
    pub fn load(sources: CertSources, provider: Arc<CryptoProvider>) -> Result<Self, CertError> {
        let (loaded, errors) = load_all(&sources, &provider, None);
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        Ok(Self {
            sources,
            provider,
            loaded: RwLock::new(Arc::new(loaded)),
            picks: Mutex::new(HashMap::new()),
            made: Mutex::new(HashMap::new()),
            group_name: OnceLock::new(),
            stats: CertStats::default(),
        })
    }

    /// Tells which names are groups' FQDNs (for `--tls-self-signed`).
    pub fn set_group_names(&self, f: GroupNames) {
        let _ = self.group_name.set(f);
    }

    /// Where certificates come from.
    pub fn sources(&self) -> &CertSources {
        &self.sources
    }

    /// Number of certificates loaded from files.
    pub fn loaded_count(&self) -> usize {
        let l = self.loaded.read();
        l.named.len() + usize::from(l.default.is_some())
    }

    /// Reads the files again if any changed (or appeared, or went away).
    /// Returns whether anything was reloaded. Blocking file I/O.
    pub fn reload_if_changed(&self) -> bool {
        let old = self.loaded.read().clone();
        if stamp(&self.sources) == old.stamp {
            return false;
        }
        let (loaded, errors) = load_all(&self.sources, &self.provider, Some(&old));
        for e in &errors {
            tracing::warn!(error = %e, "certificate not reloaded (its last good version is kept)");
        }
        self.stats.failing.store(errors.len() as u64, Relaxed);
        self.stats.reloads_ok.fetch_add(1, Relaxed);
        tracing::info!(
            certificates = loaded.named.len() + usize::from(loaded.default.is_some()),
            "certificates reloaded"
        );
        *self.loaded.write() = Arc::new(loaded);
        self.picks.lock().clear();
        true
    }

    /// The certificate for a handshake with SNI `name` (or none).
    pub fn pick(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.loaded.read().clone();
        let fallback = loaded.default.as_ref().map(|e| e.key.clone());
        let Some(name) = name else {
            return fallback;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let cached = self.picks.lock().get(&name).cloned();
        let from_files = match cached {
            Some(hit) => hit,
            None => {
                let best = loaded
                    .named
                    .iter()
                    .filter_map(|e| covers(e.leaf(), &name).map(|c| (c, e)))
                    // Highest cover; the first file among equals.
                    .fold(None::<(Cover, &Entry)>, |best, (c, e)| match best {
                        Some((b, _)) if b >= c => best,
                        _ => Some((c, e)),
                    })
                    .map(|(_, e)| e.key.clone());
                let chosen = best.or_else(|| {
                    let d = loaded.default.as_ref()?;
                    covers(d.leaf(), &name).map(|_| d.key.clone())
                });
                let mut picks = self.picks.lock();
                if picks.len() >= MAX_PICKS {
                    picks.clear();
                }
                picks.insert(name.clone(), chosen.clone());
                chosen
            }
        };
        // What the gateway makes is not remembered with the files' choices:
        // groups come and go between reloads.
        from_files.or_else(|| self.make(&name)).or(fallback)
    }

    /// A self-signed certificate for a group's FQDN, if the gateway makes
    /// them.
    fn make(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        if !self.sources.self_signed || !self.group_name.get().is_some_and(|f| f(name)) {
            return None;
        }
        if let Some(k) = self.made.lock().get(name) {
            return Some(k.clone());
        }
        let made = match self_signed(name, &self.provider) {
            Ok(k) => Arc::new(k),
            Err(e) => {
                tracing::warn!(name, error = %e, "could not make a certificate");
                return None;
            }
        };
        let mut all = self.made.lock();
        if let Some(k) = all.get(name) {
            // Another handshake made one first.
            return Some(k.clone());
        }
        // Groups come and go: the made ones are bounded like the picks.
        if all.len() >= MAX_PICKS {
            all.clear();
        }
        self.stats.made.fetch_add(1, Relaxed);
        tracing::info!(name, "made a self-signed ECDSA P-256 certificate");
        all.insert(name.to_owned(), made.clone());
        Some(made)
    }

    /// The Prometheus text of the certificates.
    pub fn metrics(&self) -> String {
        use meshlib::metrics::{Exposition, Kind};
        let mut e = Exposition::new();
        e.single(
            "istmesh_gateway_certificates",
            Kind::Gauge,
            "Certificates loaded from files (platform and directory).",
            self.loaded_count(),
        )
        .single(
            "istmesh_gateway_certificate_reloads_total",
            Kind::Counter,
            "Times the certificate files were read again after a change.",
            self.stats.reloads_ok.load(Relaxed),
        )
        .single(
            "istmesh_gateway_certificate_files_failing",
            Kind::Gauge,
            "Certificate files that failed to load at the last reload (their last good version is served).",
            self.stats.failing.load(Relaxed),
        )
        .single(
            "istmesh_gateway_certificates_made_total",
            Kind::Counter,
            "Self-signed certificates the gateway made for groups' names.",
            self.stats.made.load(Relaxed),
        );
        e.render()
    }
}

/// A self-signed ECDSA P-256 certificate for `name`.
fn self_signed(name: &str, provider: &CryptoProvider) -> Result<CertifiedKey, CertError> {
    let err = |e: &dyn fmt::Display| CertError(format!("self-signed certificate for {name}: {e}"));
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| err(&e))?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(|e| err(&e))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&pair).map_err(|e| err(&e))?;
    let key = PrivateKeyDer::try_from(pair.serialize_der()).map_err(|e| err(&e))?;
    CertifiedKey::from_der(vec![cert.der().clone()], key, provider).map_err(|e| err(&e))
}

/// The resolver rustls asks at every handshake.
#[derive(Debug)]
pub struct Resolver(pub Arc<Certs>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.pick(hello.server_name())
    }
}

/// Path, modification time and length of every file the sources name
/// (directory entries sorted), to see whether anything changed.
fn stamp(sources: &CertSources) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let one = |p: &Path| {
        let m = std::fs::metadata(p).ok();
        (
            p.to_owned(),
            m.as_ref().and_then(|m| m.modified().ok()),
            m.map_or(0, |m| m.len()),
        )
    };
    let mut out = Vec::new();
    if let Some((c, k)) = &sources.default {
        out.push(one(c));
        out.push(one(k));
    }
    if let Some(dir) = &sources.dir {
        out.extend(dir_files(dir).iter().map(|p| one(p)));
    }
    out
}

/// The regular files of the directory (symbolic links followed), hidden
/// ones left out, sorted, at most [`MAX_DIR_FILES`].
fn dir_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut out: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .take(MAX_DIR_FILES)
        .collect();
    out.sort();
    out
}

/// Loads every source. With `old`, a pair that fails keeps its version in
/// `old`; every failure is returned.
fn load_all(
    sources: &CertSources,
    provider: &Arc<CryptoProvider>,
    old: Option<&Loaded>,
) -> (Loaded, Vec<CertError>) {
    let mut errors = Vec::new();
    let mut loaded = Loaded {
        stamp: stamp(sources),
        ..Loaded::default()
    };
    if let Some((c, k)) = &sources.default {
        match load_pair(c, k, provider) {
            Ok(e) => loaded.default = Some(e),
            Err(e) => {
                errors.push(e);
                loaded.default = old.and_then(|o| o.default.clone());
            }
        }
    }
    if let Some(dir) = &sources.dir {
        match std::fs::read_dir(dir) {
            Err(e) => {
                errors.push(CertError(format!("tls-cert-dir {}: {e}", dir.display())));
                loaded.named = old.map(|o| o.named.clone()).unwrap_or_default();
            }
            Ok(_) => {
                for (cert, key) in pairs(&dir_files(dir)) {
                    match load_pair(&cert, &key, provider) {
                        Ok(e) => loaded.named.push(e),
                        Err(e) => {
                            errors.push(e);
                            if let Some(prev) =
                                old.and_then(|o| o.named.iter().find(|e| e.source == cert))
                            {
                                loaded.named.push(prev.clone());
                            }
                        }
                    }
                }
            }
        }
    }
    (loaded, errors)
}

/// The certificate and key files among `files`: `X.crt` with `X.key`, and
/// `X.pem` (with `X.key` if it exists, else holding the key itself).
fn pairs(files: &[PathBuf]) -> Vec<(PathBuf, PathBuf)> {
    let has = |p: &PathBuf| files.binary_search(p).is_ok();
    let mut out = Vec::new();
    for f in files {
        let key = f.with_extension("key");
        match f.extension().and_then(|e| e.to_str()) {
            Some("crt") | Some("cer") if has(&key) => out.push((f.clone(), key)),
            Some("pem") if has(&key) => out.push((f.clone(), key)),
            Some("pem") => out.push((f.clone(), f.clone())),
            _ => {}
        }
    }
    out
}

/// Loads a chain and its key, checking that they belong together.
fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<Entry, CertError> {
    let bad = |what: &str, path: &Path, e: &dyn fmt::Display| {
        CertError(format!("{what} {}: {e}", path.display()))
    };
    let cert_pem =
        meshlib::fsutil::read_limited(cert, MAX_FILE).map_err(|e| bad("tls-cert", cert, &e))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad("tls-cert", cert, &e))?;
    if chain.is_empty() {
        return Err(bad("tls-cert", cert, &"no certificate"));
    }
    webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| bad("tls-cert", cert, &format!("not a usable certificate: {e}")))?;
    let key_pem = if key == cert {
        cert_pem
    } else {
        meshlib::fsutil::read_limited(key, MAX_FILE).map_err(|e| bad("tls-key", key, &e))?
    };
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad("tls-key", key, &e))?;
    let signer = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| bad("tls-key", key, &e))?;
    let ck = CertifiedKey::new(chain, signer);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(bad(
                "tls-key",
                key,
                &format!("does not match the certificate {}", cert.display()),
            ))
        }
    }
    Ok(Entry {
        source: cert.to_owned(),
        key: Arc::new(ck),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `names` (`ecdsa`: P-256, else
    /// Ed25519) as PEM: (chain, key).
    fn pem(names: &[&str], ecdsa: bool) -> (String, String) {
        let alg = if ecdsa {
            &rcgen::PKCS_ECDSA_P256_SHA256
        } else {
            &rcgen::PKCS_ED25519
        };
        let pair = rcgen::KeyPair::generate_for(alg).unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        (
            params.self_signed(&pair).unwrap().pem(),
            pair.serialize_pem(),
        )
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// The first name of the certificate `ck` serves, for comparing.
    fn der(ck: &Option<Arc<CertifiedKey>>) -> Vec<u8> {
        ck.as_ref().expect("a certificate").cert[0].to_vec()
    }

    #[test]
    fn covers_tells_exact_from_wildcard() {
        let (c, _) = pem(&["shop.example.com", "*.apps.example"], true);
        let d = CertificateDer::pem_slice_iter(c.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(covers(&d, "shop.example.com"), Some(Cover::Exact));
        assert_eq!(covers(&d, "SHOP.Example.com"), Some(Cover::Exact));
        assert_eq!(covers(&d, "web-abcd.apps.example"), Some(Cover::Wildcard));
        assert_eq!(covers(&d, "a.b.apps.example"), None, "one label only");
        assert_eq!(covers(&d, "apps.example"), None);
        assert_eq!(covers(&d, "other.example.com"), None);
        assert_eq!(covers(&d, "not a name"), None);
        assert!(Cover::Exact > Cover::Wildcard);
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_the_platform_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("certs");
        std::fs::create_dir(&files).unwrap();
        // The platform's wildcard.
        let (pc, pk) = pem(&["*.apps.example"], true);
        let (pc, pk) = (
            write(dir.path(), "platform.crt", &pc),
            write(dir.path(), "platform.key", &pk),
        );
        // A group's own name (crt + key), another wildcard of the same
        // domain in one .pem, and a stray key without its certificate.
        let (sc, sk) = pem(&["shop.example.com"], false);
        write(&files, "shop.crt", &sc);
        write(&files, "shop.key", &sk);
        let (wc, wk) = pem(&["*.apps.example", "pay-x.apps.example"], true);
        write(&files, "a-wild.pem", &format!("{wc}{wk}"));
        write(&files, "stray.key", &pem(&["x.example"], true).1);
        let certs = Certs::load(
            CertSources {
                default: Some((pc.clone(), pk.clone())),
                dir: Some(files.clone()),
                self_signed: false,
            },
            provider(),
        )
        .unwrap();
        assert_eq!(certs.loaded_count(), 3);
        let platform = Certs::load(
            CertSources {
                default: Some((pc, pk)),
                ..Default::default()
            },
            provider(),
        )
        .unwrap()
        .pick(None);

        let shop = der(&certs.pick(Some("shop.example.com")));
        assert_eq!(
            shop,
            CertificateDer::pem_slice_iter(sc.as_bytes())
                .next()
                .unwrap()
                .unwrap()
                .to_vec()
        );
        assert_eq!(
            der(&certs.pick(Some("Shop.Example.COM."))),
            shop,
            "case and a trailing dot"
        );
        let wild = CertificateDer::pem_slice_iter(wc.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec();
        // The directory's wildcard wins over the platform's.
        assert_eq!(der(&certs.pick(Some("web-abcd.apps.example"))), wild);
        assert_eq!(der(&certs.pick(Some("pay-x.apps.example"))), wild);
        // No name, or a name nothing covers: the platform's certificate.
        assert_eq!(der(&certs.pick(None)), der(&platform));
        assert_eq!(der(&certs.pick(Some("elsewhere.test"))), der(&platform));
        // Remembered choices stay right.
        assert_eq!(der(&certs.pick(Some("shop.example.com"))), shop);
    }

    #[test]
    fn an_exact_name_wins_over_a_wildcard_whatever_the_file_order() {
        let dir = tempfile::tempdir().unwrap();
        let (wc, wk) = pem(&["*.apps.example"], true);
        let (ec, ek) = pem(&["web.apps.example"], true);
        write(dir.path(), "a.pem", &format!("{wc}{wk}"));
        write(dir.path(), "b.pem", &format!("{ec}{ek}"));
        let certs = Certs::load(
            CertSources {
                dir: Some(dir.path().to_owned()),
                ..Default::default()
            },
            provider(),
        )
        .unwrap();
        let exact = CertificateDer::pem_slice_iter(ec.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec();
        assert_eq!(der(&certs.pick(Some("web.apps.example"))), exact);
        assert_ne!(der(&certs.pick(Some("api.apps.example"))), exact);
        // No platform certificate: a name nothing covers gets none (the
        // handshake fails).
        assert!(certs.pick(Some("elsewhere.test")).is_none());
        assert!(certs.pick(None).is_none());
    }

    #[test]
    fn bad_files_are_errors_that_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = pem(&["a.example"], true);
        let (_, other_key) = pem(&["b.example"], true);
        let cert = write(dir.path(), "a.crt", &c);
        let key = write(dir.path(), "a.key", &other_key);
        let e = Certs::load(
            CertSources {
                default: Some((cert.clone(), key)),
                ..Default::default()
            },
            provider(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("a.key") && e.contains("does not match"), "{e}");
        let e = Certs::load(
            CertSources {
                dir: Some(dir.path().to_owned()),
                ..Default::default()
            },
            provider(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("a.key") && e.contains("does not match"), "{e}");
        write(dir.path(), "a.key", "not a key");
        let e = Certs::load(
            CertSources {
                default: Some((cert.clone(), dir.path().join("a.key"))),
                ..Default::default()
            },
            provider(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tls-key") && e.contains("a.key"), "{e}");
        let garbage = write(
            dir.path(),
            "g.crt",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let e = Certs::load(
            CertSources {
                default: Some((garbage, cert)),
                ..Default::default()
            },
            provider(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tls-cert") && e.contains("g.crt"), "{e}");
    }

    #[test]
    fn changed_files_are_read_again_and_a_broken_one_keeps_its_last_version() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = pem(&["shop.example.com"], true);
        write(dir.path(), "shop.crt", &c1);
        write(dir.path(), "shop.key", &k1);
        let certs = Certs::load(
            CertSources {
                dir: Some(dir.path().to_owned()),
                ..Default::default()
            },
            provider(),
        )
        .unwrap();
        let first = der(&certs.pick(Some("shop.example.com")));
        assert!(!certs.reload_if_changed(), "nothing changed");

        // Renewed: a new certificate and key.
        let (c2, k2) = pem(&["shop.example.com", "www.shop.example.com"], true);
        write(dir.path(), "shop.crt", &c2);
        write(dir.path(), "shop.key", &k2);
        assert!(certs.reload_if_changed());
        let second = der(&certs.pick(Some("shop.example.com")));
        assert_ne!(second, first);
        assert_eq!(der(&certs.pick(Some("www.shop.example.com"))), second);
        assert_eq!(certs.stats.failing.load(Relaxed), 0);

        // Half-written renewal (new certificate, old key): the last good
        // pair stays, the error is counted.
        let (c3, _) = pem(&["shop.example.com"], true);
        write(dir.path(), "shop.crt", &c3);
        assert!(certs.reload_if_changed());
        assert_eq!(der(&certs.pick(Some("shop.example.com"))), second);
        assert_eq!(certs.stats.failing.load(Relaxed), 1);

        // A new file: its names are served at once.
        let (c4, k4) = pem(&["new.example.org"], true);
        write(dir.path(), "new.pem", &format!("{c4}{k4}"));
        assert!(certs.reload_if_changed());
        assert!(certs.pick(Some("new.example.org")).is_some());
        // A removed file: its names are no longer served.
        std::fs::remove_file(dir.path().join("new.pem")).unwrap();
        assert!(certs.reload_if_changed());
        assert!(certs.pick(Some("new.example.org")).is_none());
        assert!(certs
            .metrics()
            .contains("istmesh_gateway_certificate_files_failing 1"));
        // Fixed: nothing fails, the fixed pair is served.
        let (c5, k5) = pem(&["shop.example.com"], true);
        write(dir.path(), "shop.crt", &c5);
        write(dir.path(), "shop.key", &k5);
        assert!(certs.reload_if_changed());
        assert_eq!(certs.stats.failing.load(Relaxed), 0);
        assert_ne!(der(&certs.pick(Some("shop.example.com"))), second);
        let text = certs.metrics();
        assert!(
            text.contains("istmesh_gateway_certificate_reloads_total 5"),
            "{text}"
        );
        meshlib::metrics::lint(&text).unwrap();
    }

    #[test]
    fn self_signed_certificates_are_ecdsa_p256_and_only_for_groups() {
        let certs = Certs::load(
            CertSources {
                self_signed: true,
                ..Default::default()
            },
            provider(),
        )
        .unwrap();
        // Before the routes are known: nothing.
        assert!(certs.pick(Some("web-abcd.apps.example")).is_none());
        certs.set_group_names(Box::new(|n| n == "web-abcd.apps.example"));
        let ck = certs.pick(Some("web-abcd.apps.example")).expect("made");
        assert_eq!(ck.key.algorithm(), rustls::SignatureAlgorithm::ECDSA);
        assert_eq!(
            covers(&ck.cert[0], "web-abcd.apps.example"),
            Some(Cover::Exact)
        );
        // Made once.
        let again = certs.pick(Some("web-abcd.apps.example")).unwrap();
        assert!(Arc::ptr_eq(&ck, &again));
        assert_eq!(certs.stats.made.load(Relaxed), 1);
        // A name that is no group's: none made (random SNIs cost nothing).
        assert!(certs.pick(Some("random.example")).is_none());
        assert_eq!(certs.stats.made.load(Relaxed), 1);
        // The key is P-256: a client offering only P-256 verifies it.
        let pk = ck.key.public_key().expect("public key");
        assert!(
            pk.as_ref()
                .windows(8)
                .any(|w| w == [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03]),
            "the prime256v1 OID"
        );
    }

    /// A real handshake per name: the client verifies the certificate it
    /// is shown against that name's own root.
    #[tokio::test]
    async fn handshakes_see_the_certificate_of_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let (ac, ak) = pem(&["a.tenant-one.example"], true);
        let (bc, bk) = pem(&["*.tenant-two.example"], false);
        write(dir.path(), "a.pem", &format!("{ac}{ak}"));
        write(dir.path(), "b.pem", &format!("{bc}{bk}"));
        let certs = Arc::new(
            Certs::load(
                CertSources {
                    dir: Some(dir.path().to_owned()),
                    ..Default::default()
                },
                provider(),
            )
            .unwrap(),
        );
        let server = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Resolver(certs))),
        );
        let shake = |root: &str, name: &'static str| {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(
                    CertificateDer::pem_slice_iter(root.as_bytes())
                        .next()
                        .unwrap()
                        .unwrap(),
                )
                .unwrap();
            let client = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let server = server.clone();
            async move {
                let (a, b) = tokio::io::duplex(64 * 1024);
                let acceptor = tokio_rustls::TlsAcceptor::from(server);
                let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
                let sn = ServerName::try_from(name).unwrap();
                let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(sn, b));
                drop(s);
                c.is_ok()
            }
        };
        assert!(shake(&ac, "a.tenant-one.example").await);
        assert!(shake(&bc, "web.tenant-two.example").await);
        // Each name is shown its own certificate, never the other's.
        assert!(!shake(&bc, "a.tenant-one.example").await);
        assert!(!shake(&ac, "web.tenant-two.example").await);
        // A name nothing covers: no certificate, no handshake.
        assert!(!shake(&ac, "c.tenant-three.example").await);
    }
}
