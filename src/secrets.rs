//! Signing secrets at rest: the key that encrypts them, and the sealing of each secret field.
//!
//! A webhook's signing secret is plaintext everywhere in the engine except in the store: `store`
//! seals every secret field on the way in (`put_webhook`) and opens it on the way out
//! (`get_webhook`, `webhooks_of`, `all_webhooks`), so a copy of the data dir without the key
//! reveals no secret. Sealing is XChaCha20-Poly1305 (RustCrypto `chacha20poly1305`) with a
//! fresh random 192-bit nonce per value; the associated data (account id · webhook id · field
//! name) binds each ciphertext to its webhook and field, so a sealed value moved onto another
//! webhook or field does not open. The key file's life (generated before anything is sealed
//! with it, never when sealed secrets exist) is `store::embedded`'s, at open.
//!
//! The key (32 bytes) comes from `KYBERHOOK_SECRETS_KEY`, else from the file named by
//! `storage.secrets_key_file`, else from `secrets.key` in the data dir, which is generated
//! (mode 0600) on first start. Either form holds 64 hex digits or the standard base64 of the
//! 32 bytes, surrounding whitespace ignored. A sealed value is the text
//! `khsec1:` + unpadded base64url(nonce ‖ ciphertext ‖ tag); any other stored value is a
//! plaintext secret from before encryption, which the store seals when it opens.
//!
//! Every secret field of [`Webhook`] is listed once, in [`webhook_secret_fields`]: a new one is
//! sealed and opened by adding it there.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::model::Webhook;

/// Environment variable holding the key (wins over `storage.secrets_key_file`).
pub const KEY_ENV: &str = "KYBERHOOK_SECRETS_KEY";
/// The key file generated in the data dir when no key is given.
pub const DATA_DIR_KEY_FILE: &str = "secrets.key";
/// What a sealed value starts with.
const SEALED_PREFIX: &str = "khsec1:";
const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(
        "{origin}: not a secrets key: {why} (expected 64 hex digits or the base64 of 32 bytes)"
    )]
    BadKey { origin: String, why: String },
    #[error("{origin}: cannot read the secrets key: {source}")]
    Read {
        origin: String,
        source: std::io::Error,
    },
    #[error("{path}: cannot write the secrets key: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a sealed signing secret is malformed")]
    Malformed,
    #[error("a sealed signing secret does not open with this key")]
    WrongKey,
}

/// The 32-byte key that seals signing secrets.
#[derive(Clone)]
pub struct SecretsKey([u8; 32]);

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(..)")
    }
}

impl SecretsKey {
    /// A key for another purpose (`label` names it), derived from this one with HMAC-SHA256,
    /// so that the sealing key itself only ever seals: the nodes of a cluster share this key,
    /// so they share what is derived from it too.
    pub fn derive(&self, label: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(&self.0)
            .expect("HMAC takes any key length");
        mac.update(label);
        mac.finalize().into_bytes().into()
    }

    /// A fresh key from the OS random number generator.
    pub fn generate() -> SecretsKey {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the OS random number generator is available");
        SecretsKey(key)
    }

    /// 64 hex digits or the standard base64 (padded or not) of 32 bytes; `origin` names where
    /// the text came from in the error.
    pub fn parse(text: &str, origin: &str) -> Result<SecretsKey, SecretsError> {
        let text = text.trim();
        let bad = |why: &str| SecretsError::BadKey {
            origin: origin.to_string(),
            why: why.to_string(),
        };
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).map_err(|_| bad("invalid hex"))?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
                .map_err(|_| {
                    bad(&format!(
                        "{} characters, neither hex nor base64",
                        text.len()
                    ))
                })?
        };
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| bad(&format!("{} bytes instead of 32", b.len())))?;
        Ok(SecretsKey(key))
    }

    /// Reads a key file.
    pub fn read(path: &Path, origin: &str) -> Result<SecretsKey, SecretsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretsError::Read {
            origin: origin.to_string(),
            source,
        })?;
        SecretsKey::parse(&text, origin)
    }

    /// Generates a key into `path` (64 hex digits, mode 0600), durable with its directory
    /// entry before any secret is sealed with it: a key lost in a crash would leave its secrets
    /// sealed for good. When another node sharing the data dir published its key first, that
    /// key is read and returned instead, so both seal with the same key. `true` when this call
    /// generated the key.
    pub fn generate_into(path: &Path, origin: &str) -> Result<(SecretsKey, bool), SecretsError> {
        let key = SecretsKey::generate();
        let text = format!("{}\n", hex::encode(key.0));
        match crate::once_file::publish(path, text.as_bytes()) {
            Ok(crate::once_file::Published::Created) => Ok((key, true)),
            Ok(crate::once_file::Published::Exists) => Ok((SecretsKey::read(path, origin)?, false)),
            Err(source) => Err(SecretsError::Write {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// Where the store's key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Given by the operator; `origin` names it in messages (`storage.secrets_key_file = …`).
    Given { key: SecretsKey, origin: String },
    /// `secrets.key` in the data dir, generated on first start.
    DataDir,
}

impl KeySource {
    /// The key the operator gave: `KYBERHOOK_SECRETS_KEY` if set, else `key_file`, else
    /// [`KeySource::DataDir`].
    pub fn from_env_or_file(key_file: Option<&Path>) -> Result<KeySource, SecretsError> {
        if let Ok(text) = std::env::var(KEY_ENV) {
            let origin = KEY_ENV.to_string();
            return Ok(KeySource::Given {
                key: SecretsKey::parse(&text, &origin)?,
                origin,
            });
        }
        match key_file {
            Some(path) => {
                let origin = format!("storage.secrets_key_file = {:?}", path.display());
                Ok(KeySource::Given {
                    key: SecretsKey::read(path, &origin)?,
                    origin,
                })
            }
            None => Ok(KeySource::DataDir),
        }
    }
}

/// Seals and opens secret values under one key.
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl Sealer {
    pub fn new(key: &SecretsKey) -> Sealer {
        Sealer {
            cipher: XChaCha20Poly1305::new((&key.0).into()),
        }
    }

    /// Whether a stored value is sealed (anything else is a plaintext secret from before).
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(SEALED_PREFIX)
    }

    /// Seals `plaintext`, bound to `context` (which must be given again to open it).
    pub fn seal(&self, plaintext: &str, context: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random number generator is available");
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: context,
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any message of this size");
        let mut raw = Vec::with_capacity(NONCE_LEN + sealed.len());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&sealed);
        format!(
            "{SEALED_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        )
    }

    /// Opens a value made by [`Sealer::seal`] with the same `context`.
    pub fn open(&self, stored: &str, context: &[u8]) -> Result<String, SecretsError> {
        let encoded = stored
            .strip_prefix(SEALED_PREFIX)
            .ok_or(SecretsError::Malformed)?;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| SecretsError::Malformed)?;
        if raw.len() < NONCE_LEN {
            return Err(SecretsError::Malformed);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: context,
                },
            )
            .map_err(|_| SecretsError::WrongKey)?;
        String::from_utf8(plain).map_err(|_| SecretsError::Malformed)
    }

    /// The webhook as stored: every secret field sealed (an already sealed one is kept).
    pub fn seal_webhook(&self, hook: &Webhook) -> Webhook {
        let mut sealed = hook.clone();
        let (account, id) = (sealed.account_id.clone(), sealed.id);
        for (field, value) in webhook_secret_fields(&mut sealed) {
            if !Sealer::is_sealed(value) {
                *value = self.seal(value, &context(account.as_str(), id.0, field));
            }
        }
        sealed
    }

    /// The webhook as the engine uses it: every secret field opened. A plaintext field (written
    /// before secrets were encrypted) is returned as it is.
    pub fn open_webhook(&self, mut hook: Webhook) -> Result<Webhook, SecretsError> {
        let (account, id) = (hook.account_id.clone(), hook.id);
        for (field, value) in webhook_secret_fields(&mut hook) {
            if Sealer::is_sealed(value) {
                *value = self.open(value, &context(account.as_str(), id.0, field))?;
            }
        }
        Ok(hook)
    }
}

/// Whether any secret field of a stored webhook is still plaintext.
pub fn has_plaintext_secret(stored: &mut Webhook) -> bool {
    webhook_secret_fields(stored)
        .into_iter()
        .any(|(_, v)| !Sealer::is_sealed(v))
}

/// Every signing-secret field of a webhook, with the name bound into its ciphertext. The one
/// place to add a field: an `Option<String>` field is listed when it is `Some`, e.g.
/// `if let Some(s) = hook.next_secret.as_mut() { fields.push(("next_secret", s)) }`.
pub fn webhook_secret_fields(hook: &mut Webhook) -> Vec<(&'static str, &mut String)> {
    let mut fields = vec![("secret", &mut hook.secret)];
    // The secret a rotation replaced, kept for its grace period.
    if let Some(s) = hook.previous_secret.as_mut() {
        fields.push(("previous_secret", s));
    }
    fields
}

/// Associated data of one sealed field: which webhook and which field it belongs to.
fn context(account: &str, webhook: u64, field: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + account.len() + field.len());
    out.extend_from_slice(b"kyberhook webhook secret v1\0");
    out.extend_from_slice(account.as_bytes());
    out.push(0);
    out.extend_from_slice(&webhook.to_be_bytes());
    out.extend_from_slice(field.as_bytes());
    out
}

/// Why a signing secret a customer supplied was refused (see [`check_supplied_secret`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeakSecret {
    #[error("the signing secret must be \"whsec_\" and 64 lowercase hex digits")]
    Shape,
    #[error(
        "the signing secret is too regular to be random ({0}); use the one the engine generated"
    )]
    Patterned(&'static str),
}

/// Checks a signing secret a customer sent back (step 3 of Add Webhook, or `secret` on create)
/// for at least 128 bits from a real random source. A secret the engine minted is 32 random
/// bytes (256 bits); any value of the same shape that a person or a broken generator made —
/// `whsec_` + 64 zeros, a repeated or counting pattern — fails one of these tests, which a
/// random value passes except with a probability far below 2^-128:
///
/// - the digits' frequency entropy is at least 3 bits each (random: about 3.8);
/// - at least 48 of the 62 three-digit windows differ (random: 61 or 62);
/// - as 32 bytes, at least 24 distinct values (random: about 30) and at least 8 distinct
///   steps from one byte to the next (counting sequences have one).
pub fn check_supplied_secret(secret: &str) -> Result<(), WeakSecret> {
    if !crate::signing::is_minted_secret(secret) {
        return Err(WeakSecret::Shape);
    }
    let hex = &secret.as_bytes()[crate::signing::SECRET_PREFIX.len()..];
    let mut counts = [0u32; 16];
    for &c in hex {
        counts[hex_value(c) as usize] += 1;
    }
    let n = hex.len() as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    if entropy < 3.0 {
        return Err(WeakSecret::Patterned("too few different digits"));
    }
    let trigrams: std::collections::HashSet<&[u8]> = hex.windows(3).collect();
    if trigrams.len() < 48 {
        return Err(WeakSecret::Patterned("repeated runs of digits"));
    }
    let bytes: Vec<u8> = hex
        .chunks(2)
        .map(|p| hex_value(p[0]) << 4 | hex_value(p[1]))
        .collect();
    let distinct: std::collections::HashSet<u8> = bytes.iter().copied().collect();
    let steps: std::collections::HashSet<u8> =
        bytes.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
    // 32 random bytes have fewer than 24 distinct values about once in 80 000 (simulated:
    // 1.25e-5), which rejected one user's random secret in that many and failed the test
    // below in ~2.5 % of runs; fewer than 20 was never seen in 400 000 draws.
    if distinct.len() < 20 || steps.len() < 8 {
        return Err(WeakSecret::Patterned(
            "a repeated or counting byte sequence",
        ));
    }
    Ok(())
}

fn hex_value(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        _ => c - b'a' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AccountId, WebhookId};
    use crate::model::WebhookStatus;

    fn hook(id: u64, secret: &str) -> Webhook {
        Webhook {
            id: WebhookId(id),
            account_id: AccountId::parse("acc_s").unwrap(),
            name: "h".into(),
            url: "https://example.com/".into(),
            description: None,
            events: vec!["*".into()],
            ip_allowlist: vec![],
            status: WebhookStatus::Active,
            disabled_reason: None,
            consecutive_failures: 0,
            secret: secret.into(),
            created_ms: 0,
            updated_ms: 0,
            signature_scheme: Default::default(),
            previous_secret: None,
            rotation_ends_ms: None,
            ordering: Default::default(),
            max_concurrency: None,
        }
    }

    #[test]
    fn keys_parse_from_hex_and_base64_and_refuse_the_rest() {
        let hex64 = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let a = SecretsKey::parse(&format!("  {hex64}\n"), "t").unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(a.0);
        assert_eq!(SecretsKey::parse(&b64, "t").unwrap().0, a.0);
        assert_eq!(
            SecretsKey::parse(b64.trim_end_matches('='), "t").unwrap().0,
            a.0
        );
        for bad in ["", "abc", &hex64[..62], "zz", &format!("{hex64}00")] {
            let err = SecretsKey::parse(bad, "KEYVAR").unwrap_err().to_string();
            assert!(err.starts_with("KEYVAR: "), "{err}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn sealed_secrets_open_only_with_their_key_webhook_and_field() {
        let key = SecretsKey::generate();
        let sealer = Sealer::new(&key);
        let plain = hook(7, "whsec_0123456789abcdef");
        let sealed = sealer.seal_webhook(&plain);
        assert!(Sealer::is_sealed(&sealed.secret));
        assert!(!sealed.secret.contains("0123456789abcdef"));
        // A fresh nonce each time: the same secret never seals to the same text.
        assert_ne!(sealer.seal_webhook(&plain).secret, sealed.secret);
        assert_eq!(sealer.open_webhook(sealed.clone()).unwrap(), plain);
        // Sealing is idempotent on sealed fields.
        assert_eq!(sealer.seal_webhook(&sealed).secret, sealed.secret);
        // Another key, or the value moved to another webhook: it does not open.
        let other = Sealer::new(&SecretsKey::generate());
        assert!(matches!(
            other.open_webhook(sealed.clone()),
            Err(SecretsError::WrongKey)
        ));
        let mut moved = hook(8, "");
        moved.secret = sealed.secret.clone();
        assert!(matches!(
            sealer.open_webhook(moved),
            Err(SecretsError::WrongKey)
        ));
        // A plaintext value from before encryption passes through.
        assert_eq!(sealer.open_webhook(plain.clone()).unwrap(), plain);
    }

    #[test]
    fn a_generated_key_file_is_private_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATA_DIR_KEY_FILE);
        let (key, generated) = SecretsKey::generate_into(&path, "f").unwrap();
        assert!(generated);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(SecretsKey::read(&path, "f").unwrap().0, key.0);
        // Never overwritten: a second start reads the first key.
        let (again, generated) = SecretsKey::generate_into(&path, "f").unwrap();
        assert!(!generated);
        assert_eq!(again.0, key.0);
    }

    #[test]
    fn supplied_secrets_need_to_look_random() {
        for _ in 0..2000 {
            let minted = crate::signing::new_secret();
            assert_eq!(check_supplied_secret(&minted), Ok(()), "{minted}");
        }
        let counting: String = (0u8..32).map(|b| format!("{b:02x}")).collect();
        let weak = [
            "0".repeat(64),
            "f".repeat(64),
            "0123456789abcdef".repeat(4),
            "deadbeef".repeat(8),
            "0a".repeat(32),
            counting,
            format!("{}{}", "0".repeat(32), &crate::signing::new_secret()[6..38]),
        ];
        for hex in weak {
            let secret = format!("whsec_{hex}");
            assert!(
                matches!(
                    check_supplied_secret(&secret),
                    Err(WeakSecret::Patterned(_))
                ),
                "{secret}"
            );
        }
        assert_eq!(check_supplied_secret("whsec_xyz"), Err(WeakSecret::Shape));
    }
}
