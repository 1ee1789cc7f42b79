//! Request signing: the `X-KyberAccess-Signature` every endpoint can verify, and the signing
//! secrets themselves.
//!
//! In: a webhook's secret, the attempt's unix-seconds timestamp and the exact body bytes. Out:
//! `sha256=` + lowercase hex of HMAC-SHA256(key = the secret string's UTF-8 bytes,
//! message = `TIMESTAMP + "." + BODY`), exactly what the guide's Python and Node verifiers
//! compute.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Prefix of every signing secret; the whole string (prefix included) is the HMAC key.
pub const SECRET_PREFIX: &str = "whsec_";

/// A fresh signing secret: 32 bytes from the OS RNG, hex, behind [`SECRET_PREFIX`].
pub fn new_secret() -> String {
    format!("{SECRET_PREFIX}{}", crate::ids::random_hex(32))
}

/// A fresh account API key (shown once; only its hash is kept).
pub fn new_api_key() -> String {
    format!("khk_{}", crate::ids::random_hex(32))
}

/// SHA-256 of an API key, the form in which keys are stored and looked up.
pub fn hash_api_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Lowercase hex HMAC-SHA256 of `timestamp.body` under `secret`.
pub fn signature_hex(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    let mut ts = itoa_buf(timestamp);
    ts.push(b'.');
    mac.update(&ts);
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The `X-KyberAccess-Signature` header value.
pub fn signature_header(secret: &str, timestamp: u64, body: &[u8]) -> String {
    format!("sha256={}", signature_hex(secret, timestamp, body))
}

fn itoa_buf(n: u64) -> Vec<u8> {
    n.to_string().into_bytes()
}

/// Constant-time string comparison (admin token, signatures).
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    // Compare digests so the length of the secret does not leak through timing either.
    let da = Sha256::digest(a.as_bytes());
    let db = Sha256::digest(b.as_bytes());
    da.ct_eq(&db).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_known_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Our framing: the message is "TIMESTAMP.BODY". Here the split puts "what do ya want
        // for nothing?" as timestamp-less text, so build it through the public function with a
        // body that completes it.
        let sig = signature_hex("Jefe", 1705312200, br#"{"a":1}"#);
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(br#"1705312200.{"a":1}"#);
        assert_eq!(sig, hex::encode(mac.finalize().into_bytes()));
        assert_eq!(sig.len(), 64);
        assert!(sig
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }

    #[test]
    fn header_has_prefix_and_depends_on_every_input() {
        let h = signature_header("whsec_x", 1, b"{}");
        assert!(h.starts_with("sha256="));
        assert_ne!(h, signature_header("whsec_y", 1, b"{}"));
        assert_ne!(h, signature_header("whsec_x", 2, b"{}"));
        assert_ne!(h, signature_header("whsec_x", 1, b"{ }"));
    }

    #[test]
    fn secrets_and_keys_are_random_and_prefixed() {
        let a = new_secret();
        assert!(a.starts_with(SECRET_PREFIX) && a.len() == SECRET_PREFIX.len() + 64);
        assert_ne!(a, new_secret());
        assert_ne!(hash_api_key("a"), hash_api_key("b"));
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
    }
}
