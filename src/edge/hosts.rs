//! The `Host` allowlist of the API listener, the defence against DNS rebinding.
//!
//! A web page the operator opens can point its own name at 127.0.0.1 and then call the API
//! from the operator's browser: the browser treats it as the page's own origin, but still sends
//! the page's name in `Host`. So a request is served only when its `Host` (port ignored) is an
//! address literal the engine answers on — the listen address, the address the connection
//! arrived on, or any loopback literal — `localhost`, or a name in `server.public_hosts`.
//! Anything else is refused with 421 before routing or authentication ([`super::router`]
//! decides, the front end renders: JSON `misdirected_request` on `/v1`, a plain page on `/ui`).
//! A request without `Host` (HTTP/1.0) carries no name a page could have chosen and is let
//! through.

use std::net::{IpAddr, SocketAddr};

use http::{header, Request};

/// The names and addresses one listener answers to.
#[derive(Debug, Clone, Copy)]
pub struct HostAllowlist<'a> {
    listen: IpAddr,
    /// Lowercase, without a trailing dot (see `config::parse_host_name`).
    names: &'a [String],
}

impl<'a> HostAllowlist<'a> {
    pub fn new(listen: SocketAddr, public_hosts: &'a [String]) -> Self {
        HostAllowlist {
            listen: listen.ip(),
            names: public_hosts,
        }
    }

    /// Whether a request with this `Host` value, arriving on `local` (the connection's own
    /// address), is for us.
    pub fn allows(&self, host: &str, local: Option<IpAddr>) -> bool {
        let Some(name) = host_without_port(host) else {
            return false;
        };
        if let Ok(ip) = name.parse::<IpAddr>() {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            return ip.is_loopback()
                || (!self.listen.is_unspecified() && ip == self.listen)
                || local.is_some_and(|l| l == ip);
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        name == "localhost" || self.names.contains(&name)
    }

    /// Whether `req` may be served: its `Host` (or the authority of an absolute-form target)
    /// is allowed, or it names none.
    pub fn admits<B>(&self, req: &Request<B>, local: Option<IpAddr>) -> bool {
        match req.headers().get(header::HOST) {
            Some(value) => value.to_str().is_ok_and(|h| self.allows(h, local)),
            None => match req.uri().authority() {
                None => true,
                Some(a) => self.allows(a.as_str(), local),
            },
        }
    }
}

/// `name` of `name`, `name:port`, `[v6]` or `[v6]:port`; `None` when malformed.
fn host_without_port(host: &str) -> Option<&str> {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        return (after.is_empty() || port(after.strip_prefix(':')?)).then_some(inside);
    }
    match host.rsplit_once(':') {
        Some((name, p)) if !name.contains(':') => port(p).then_some(name),
        // Several colons without brackets: not a valid Host.
        Some(_) => None,
        None => (!host.is_empty()).then_some(host),
    }
}

fn port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_localhost_the_listen_address_and_public_hosts_only() {
        let names = ["hooks.example.com".to_string()];
        let list = HostAllowlist::new("192.0.2.10:8080".parse().unwrap(), &names);
        for ok in [
            "127.0.0.1:8080",
            "127.9.9.9",
            "[::1]:8080",
            "[::ffff:127.0.0.1]",
            "localhost:8080",
            "LOCALHOST.",
            "192.0.2.10:8080",
            "hooks.example.com",
            "HOOKS.example.com:443",
        ] {
            assert!(list.allows(ok, None), "{ok}");
        }
        for bad in [
            "rebind.attacker.example:8080",
            "example.com",
            "hooks.example.com.evil",
            "localhost.attacker.example",
            "192.0.2.11",
            "10.0.0.1:8080",
            "",
            ":8080",
            "::1",
            "[::1",
            "127.0.0.1:80x",
        ] {
            assert!(!list.allows(bad, None), "{bad}");
        }
        // On 0.0.0.0 the address a connection arrived on is the engine's own.
        let any = HostAllowlist::new("0.0.0.0:8080".parse().unwrap(), &[]);
        let local: IpAddr = "198.51.100.4".parse().unwrap();
        assert!(any.allows("198.51.100.4:8080", Some(local)));
        assert!(!any.allows("198.51.100.5:8080", Some(local)));
        assert!(!any.allows("0.0.0.0:8080", Some(local)));
    }
}
