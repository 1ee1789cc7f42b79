//! The operator's maintenance commands behind `kyberhook backup`, `restore` and `compact`.
//!
//! `main` parses the command line and calls one function here; each returns the line to print
//! on success, or a [`Failure`] with its exit code (2: the operator's input — a non-empty data
//! dir, a running engine, a damaged or too new backup, a bad URL or missing token; 1: anything
//! else). `backup` is an HTTP(S) client of `POST /v1/admin/backup` that writes `FILE.partial`,
//! checks the stream's trailer, syncs and renames it to `FILE`, so a `FILE` is always a whole
//! backup. `restore` and `compact` work on a data dir through `store::embedded::backup` and
//! `store::embedded::compact`. `restore` writes into `PATH.restore-tmp` (sled batches, flush,
//! fsync of every file), then renames it over the empty or missing data dir, so a damaged or
//! truncated stream leaves nothing behind; run as root, it gives the new store the owner of
//! the empty target (as `compact` does). The secrets key (`secrets.key`, or the configured
//! key) is not a tree and never in a backup: a restored store needs the key it was sealed
//! with.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::store::StoreErrorKind;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::api::admin::BACKUP_PATH;
use crate::config::Config;
use crate::secrets::{KeySource, DATA_DIR_KEY_FILE};
use crate::store::embedded::backup::{self, RestoreError};
use crate::store::embedded::compact::{self, CompactError};
use crate::store::embedded::StoreOptions;

/// Why a command failed, and the exit code that says so.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn failed(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The backup route's URL from the engine's base URL (or the route's own URL).
pub fn backup_url(url: &str) -> Result<Uri, Failure> {
    let trimmed = url.trim_end_matches('/');
    let full = if trimmed.ends_with(BACKUP_PATH) {
        trimmed.to_string()
    } else {
        format!("{trimmed}{BACKUP_PATH}")
    };
    let uri: Uri = full
        .parse()
        .map_err(|e| usage(format!("backup: --url {url:?}: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => Err(usage(format!(
            "backup: --url {url:?} must be http:// or https:// with a host, e.g. http://127.0.0.1:8080"
        ))),
    }
}

fn client_tls(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, Failure> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| usage(format!("backup: --ca-file {:?}: {e}", path.display())))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| usage(format!("backup: --ca-file {:?}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| failed(format!("backup: TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// `kyberhook backup`: downloads a snapshot from a running engine into `out`.
pub async fn backup(
    url: &str,
    out: &Path,
    token: &str,
    ca_file: Option<&Path>,
) -> Result<String, Failure> {
    let uri = backup_url(url)?;
    if token.is_empty() {
        return Err(usage(
            "backup: no admin token: pass --token or set KYBERHOOK_ADMIN_TOKEN",
        ));
    }
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls(ca_file)?)
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let req = Request::builder()
        .method(Method::POST)
        .uri(uri.clone())
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Empty::new())
        .map_err(|e| usage(format!("backup: {e}")))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| failed(format!("backup: {uri}: {e}")))?;
    if resp.status() != StatusCode::OK {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        let code = if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            2
        } else {
            1
        };
        return Err(Failure {
            code,
            message: format!("backup: {uri}: HTTP {status}: {message}"),
        });
    }
    let partial = {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        out.with_file_name(name)
    };
    let write_err = |e: io::Error| failed(format!("backup: {}: {e}", partial.display()));
    let mut file = io::BufWriter::new(create_private(&partial).map_err(write_err)?);
    let mut body = resp.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let _ = fs::remove_file(&partial);
            failed(format!(
                "backup: the stream broke off after {bytes} bytes: {e}"
            ))
        })?;
        if let Ok(data) = frame.into_data() {
            bytes += data.len() as u64;
            file.write_all(&data).map_err(write_err)?;
        }
    }
    let file = file.into_inner().map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    let check = fs::File::open(&partial).map_err(write_err).and_then(|f| {
        backup::verify(io::BufReader::new(f))
            .map_err(|e| failed(format!("backup: the downloaded stream is damaged: {e}")))
    });
    let (header, records) = match check {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
    };
    fs::rename(&partial, out).map_err(|e| failed(format!("backup: {}: {e}", out.display())))?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(format!(
        "backup written to {} ({}, {records} records, store format {}); the secrets key is not \
         in it: keep it separately",
        out.display(),
        mib(bytes),
        header.format_version
    ))
}

/// Creates (or truncates) `path` readable by its owner only — a backup holds event payloads,
/// visitor data among them — without following a symlink planted where it goes. A file left
/// with a wider mode by an earlier run is narrowed through its descriptor.
fn create_private(path: &Path) -> io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    let file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// `kyberhook restore`: writes the backup `from` into the data dir (`storage.path` of
/// `config`), which must be empty or missing.
pub fn restore(from: &Path, config: &Config) -> Result<String, Failure> {
    let data = &config.storage.path;
    if let Ok(mut entries) = fs::read_dir(data) {
        if entries.next().is_some() {
            return Err(usage(format!(
                "restore: storage.path {:?} is not empty: restore only into an empty or new data dir",
                data.display()
            )));
        }
    } else if data.exists() {
        return Err(usage(format!(
            "restore: storage.path {:?} is not a directory",
            data.display()
        )));
    }
    let input = fs::File::open(from)
        .map_err(|e| usage(format!("restore: --from {:?}: {e}", from.display())))?;
    let tmp = {
        let mut name = data.file_name().unwrap_or_default().to_os_string();
        name.push(".restore-tmp");
        data.with_file_name(name)
    };
    let tmp_err = |e: io::Error| failed(format!("restore: {}: {e}", tmp.display()));
    if tmp.exists() {
        // Left by an interrupted restore: never opened as a store, ours to remove.
        fs::remove_dir_all(&tmp).map_err(tmp_err)?;
    }
    if let Some(parent) = tmp.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(tmp_err)?;
    }
    let restored = backup::restore(io::BufReader::with_capacity(1 << 20, input), &tmp);
    let (header, records) = match restored {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            let code = match e {
                RestoreError::Corrupt(_) | RestoreError::TooNew { .. } => 2,
                _ => 1,
            };
            return Err(Failure {
                code,
                message: format!("restore: {}: {e}", from.display()),
            });
        }
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o700)).map_err(tmp_err)?;
    }
    if data.exists() {
        // An empty data dir made for the service user (the package's /var/lib/kyberhook):
        // restored as root, the store is that user's.
        compact::own_like(&tmp, data).map_err(tmp_err)?;
        // An empty directory: rename cannot replace it on every platform.
        fs::remove_dir(data).map_err(|e| failed(format!("restore: {}: {e}", data.display())))?;
    }
    fs::rename(&tmp, data).map_err(|e| failed(format!("restore: {}: {e}", data.display())))?;
    let parent: PathBuf = data
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let _ = fs::File::open(parent).and_then(|d| d.sync_all());
    // The key is not in a backup: say where the engine will look for it.
    let key_given = std::env::var_os(crate::secrets::KEY_ENV).is_some()
        || config.storage.secrets_key_file.is_some();
    let key_note = if key_given {
        "the engine will open its webhook secrets with the key the config (or \
         KYBERHOOK_SECRETS_KEY) names: it must be the key of the engine the backup came from"
            .to_string()
    } else {
        format!(
            "before starting the engine, copy {DATA_DIR_KEY_FILE} from the data dir the backup \
             came from into {} (or name that key in storage.secrets_key_file)",
            data.display()
        )
    };
    Ok(format!(
        "restored {records} records (store format {}) into {}; {key_note}",
        header.format_version,
        data.display()
    ))
}

/// `kyberhook compact`: rewrites the stopped engine's store (`storage.path` of `config`).
pub fn compact(config: &Config) -> Result<String, Failure> {
    let data = &config.storage.path;
    let options = StoreOptions {
        fsync: false,
        cache_bytes: config.storage.cache_size,
        secrets: KeySource::from_env_or_file(config.storage.secrets_key_file.as_deref())
            .map_err(|e| usage(format!("compact: {e}")))?,
    };
    match compact::compact(data, &options) {
        Ok(c) => Ok(format!(
            "compacted {}: {} -> {} ({} records)",
            data.display(),
            mib(c.bytes_before),
            mib(c.bytes_after),
            c.records
        )),
        Err(e) => {
            let code = match e {
                CompactError::InUse(_) | CompactError::NoStore(_) => 2,
                CompactError::Store(ref e) if e.kind() == StoreErrorKind::Operator => 2,
                _ => 1,
            };
            Err(Failure {
                code,
                message: format!("compact: {e}"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_urls() {
        for (given, want) in [
            (
                "http://127.0.0.1:8080",
                "http://127.0.0.1:8080/v1/admin/backup",
            ),
            ("https://h:1/", "https://h:1/v1/admin/backup"),
            ("http://h/v1/admin/backup", "http://h/v1/admin/backup"),
        ] {
            assert_eq!(backup_url(given).unwrap().to_string(), want);
        }
        for bad in ["127.0.0.1:8080", "ftp://h", "http://"] {
            assert_eq!(backup_url(bad).unwrap_err().code, 2, "{bad}");
        }
    }
}
