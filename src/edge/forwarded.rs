//! The client address a PostgreSQL standby forwards a request for. The serving node limits
//! failed sign-ins and bearer guessing per client address; a forwarded request comes from the
//! standby's address, so without this every client of a standby would share one allowance —
//! one guesser could lock all of them out. The standby names the client in
//! `x-kyberhook-client: IP;UNIX_SECONDS;HEX`, HEX an HMAC-SHA256 under a key derived from the
//! secrets key that every node of a cluster shares ([`ForwardKey`]). The serving node believes
//! the header only if the MAC holds and the time is within [`MAX_SKEW_S`] of its own clock (a
//! copied header is soon worthless), and drops it from every request otherwise. A node on the
//! embedded store has no standbys and holds no key, so it believes nothing.
//!
//! In: the secrets key (the config's source, or the data dir's file). Out: a header value to
//! send ([`ForwardKey::sign`]) and the address a received one names ([`ForwardKey::verify`]).

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use http::HeaderValue;
use sha2::Sha256;

use crate::config::Config;
use crate::secrets::{self, KeySource, SecretsKey};

/// The header a standby names its client in.
pub const HEADER: &str = "x-kyberhook-client";

/// Names the node that forwarded (relayed) a request, on the request and on its answer. A
/// request goes through one such node at most.
pub const FORWARDED_BY: &str = "x-kyberhook-forwarded-by";

/// Headers that belong to one connection, not to the request (RFC 9110 7.6.1): never forwarded.
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
];

/// How far a header's time may be from the receiving node's clock.
pub const MAX_SKEW_S: u64 = 60;

/// The key both ends of a forward hold.
#[derive(Clone)]
pub struct ForwardKey([u8; 32]);

impl std::fmt::Debug for ForwardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForwardKey(..)")
    }
}

/// Seconds since the Unix epoch on this node's clock.
pub fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ForwardKey {
    pub fn new(secrets: &SecretsKey) -> ForwardKey {
        ForwardKey(secrets.derive(b"kyberhook forwarded client v1"))
    }

    /// The key from `KYBERHOOK_SECRETS_KEY`, `storage.secrets_key_file`, or the data dir's
    /// key file if it exists (`None` without one: then no header is sent or believed).
    pub fn load(config: &Config) -> Option<ForwardKey> {
        let key = match KeySource::from_env_or_file(config.storage.secrets_key_file.as_deref()) {
            Ok(KeySource::Given { key, .. }) => key,
            Ok(KeySource::DataDir) => {
                let file = config.storage.path.join(secrets::DATA_DIR_KEY_FILE);
                SecretsKey::read(&file, "the data dir's key file").ok()?
            }
            Err(_) => return None,
        };
        Some(ForwardKey::new(&key))
    }

    fn mac(&self, ip: &str, at: &str) -> Hmac<Sha256> {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(ip.as_bytes());
        mac.update(b";");
        mac.update(at.as_bytes());
        mac
    }

    /// The header value naming `ip` at `unix_s`.
    pub fn sign(&self, ip: IpAddr, unix_s: u64) -> HeaderValue {
        let (ip, at) = (ip.to_string(), unix_s.to_string());
        let tag = hex::encode(self.mac(&ip, &at).finalize().into_bytes());
        HeaderValue::from_str(&format!("{ip};{at};{tag}")).expect("an address, digits and hex")
    }

    /// The address a header value names, if this key signed it within [`MAX_SKEW_S`] of
    /// `now_s`.
    pub fn verify(&self, value: &[u8], now_s: u64) -> Option<IpAddr> {
        let text = std::str::from_utf8(value).ok()?;
        let mut parts = text.splitn(3, ';');
        let (ip, at, tag) = (parts.next()?, parts.next()?, parts.next()?);
        let tag = hex::decode(tag).ok()?;
        self.mac(ip, at).verify_slice(&tag).ok()?;
        if at.parse::<u64>().ok()?.abs_diff(now_s) > MAX_SKEW_S {
            return None;
        }
        ip.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> ForwardKey {
        ForwardKey::new(&SecretsKey::parse(&format!("{byte:02x}").repeat(32), "test").unwrap())
    }

    #[test]
    fn a_header_is_believed_only_under_the_same_key_and_in_time() {
        let (k, other) = (key(0x5a), key(0x5b));
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let v = k.sign(ip, 1_000_000);
        assert_eq!(k.verify(v.as_bytes(), 1_000_000), Some(ip));
        assert_eq!(k.verify(v.as_bytes(), 1_000_000 + MAX_SKEW_S), Some(ip));
        // Copied later, or signed by a node with another key: not believed.
        assert_eq!(k.verify(v.as_bytes(), 1_000_000 + MAX_SKEW_S + 1), None);
        assert_eq!(other.verify(v.as_bytes(), 1_000_000), None);
        // Another address, or another time, under the same tag: not believed.
        let text = v.to_str().unwrap();
        let forged = text.replacen("203.0.113.7", "203.0.113.8", 1);
        assert_eq!(k.verify(forged.as_bytes(), 1_000_000), None);
        let shifted = text.replacen(";1000000;", ";1000001;", 1);
        assert_eq!(k.verify(shifted.as_bytes(), 1_000_000), None);
        for junk in [
            "",
            "203.0.113.7",
            "203.0.113.7;1000000",
            "x;y;z",
            "1.2.3.4;5;zz",
        ] {
            assert_eq!(k.verify(junk.as_bytes(), 1_000_000), None, "{junk:?}");
        }
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(k.verify(k.sign(v6, 7).as_bytes(), 7), Some(v6));
    }
}
