//! Dashboard sessions, held in memory: who signed in (an account or the operator), the
//! session's CSRF token and a one-shot notice for the next page.
//!
//! A session enters at sign-in ([`Sessions::create`] returns the random id for the cookie) and
//! is found again by that id on every request ([`Sessions::lookup`]); only the id's SHA-256 is
//! kept, so the map never holds a usable cookie. A session ends after `session_idle` unused or
//! `session_absolute` after sign-in (both read from the engine clock, so tests can move time),
//! at logout, or when the account's API key changes or the account is deleted. The map is
//! bounded: at [`MAX_SESSIONS`] the least recently used session goes first.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::api::Caller;
use crate::clock;
use crate::config::UiLimits;
use crate::registry::Registry;

/// Sessions held at once.
pub const MAX_SESSIONS: usize = 10_000;

/// What a request learns from its session.
#[derive(Debug, Clone)]
pub struct Session {
    pub caller: Caller,
    pub csrf: String,
}

struct Entry {
    session: Session,
    /// The account's API-key hash at sign-in: a rotated key ends the session.
    key_hash: Option<[u8; 32]>,
    created_ms: u64,
    last_ms: u64,
    notice: Option<String>,
}

pub struct Sessions {
    /// One std mutex: every operation is a short map update, never held across an await.
    entries: Mutex<HashMap<[u8; 32], Entry>>,
    idle_ms: u64,
    absolute_ms: u64,
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    pub fn new(limits: &UiLimits) -> Self {
        Sessions {
            entries: Mutex::new(HashMap::new()),
            idle_ms: limits.session_idle.as_millis() as u64,
            absolute_ms: limits.session_absolute.as_millis() as u64,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        // A panic elsewhere never leaves an entry half-written: keep serving.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn live(&self, e: &Entry, now: u64) -> bool {
        now.saturating_sub(e.last_ms) < self.idle_ms
            && now.saturating_sub(e.created_ms) < self.absolute_ms
    }

    /// Starts a session for `caller`; returns the id to put in the cookie.
    pub fn create(&self, caller: Caller, registry: &Registry) -> String {
        let id = crate::ids::random_hex(32);
        let key_hash = match &caller {
            Caller::Account(a) => registry.account(a).map(|acc| acc.api_key_hash),
            Caller::Admin => None,
        };
        let now = clock::now_ms();
        let entry = Entry {
            session: Session {
                caller,
                csrf: crate::ids::random_hex(32),
            },
            key_hash,
            created_ms: now,
            last_ms: now,
            notice: None,
        };
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, e| self.live(e, now));
        }
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, e)| e.last_ms).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(digest(&id), entry);
        id
    }

    /// The live session `id` names, marked as used now; an expired or revoked one is removed.
    pub fn lookup(&self, id: &str, registry: &Registry) -> Option<Session> {
        let key = digest(id);
        let now = clock::now_ms();
        let mut map = self.lock();
        let entry = map.get_mut(&key)?;
        let still_valid = match &entry.session.caller {
            Caller::Admin => true,
            Caller::Account(a) => registry
                .account(a)
                .is_some_and(|acc| Some(acc.api_key_hash) == entry.key_hash),
        };
        if !still_valid || !self.live(entry, now) {
            map.remove(&key);
            return None;
        }
        entry.last_ms = now;
        Some(entry.session.clone())
    }

    /// Leaves a notice for the next page this session shows.
    pub fn set_notice(&self, id: &str, notice: impl Into<String>) {
        if let Some(e) = self.lock().get_mut(&digest(id)) {
            e.notice = Some(notice.into());
        }
    }

    pub fn take_notice(&self, id: &str) -> Option<String> {
        self.lock()
            .get_mut(&digest(id))
            .and_then(|e| e.notice.take())
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(&digest(id));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ids::AccountId;
    use crate::model::Account;

    fn setup(idle: u64, absolute: u64) -> (Sessions, Registry) {
        let limits = UiLimits {
            session_idle: Duration::from_secs(idle),
            session_absolute: Duration::from_secs(absolute),
            login_attempts_per_minute: 10,
        };
        let registry = Registry::new(Vec::new());
        registry.upsert_account(Account {
            id: AccountId::parse("acme").unwrap(),
            name: "Acme".into(),
            plan: "starter".into(),
            created_ms: 0,
            api_key_hash: [1; 32],
        });
        (Sessions::new(&limits), registry)
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_a_session_and_use_extends_it() {
        let (sessions, registry) = setup(30 * 60, 12 * 3600);
        let id = sessions.create(Caller::Admin, &registry);
        tokio::time::advance(Duration::from_secs(29 * 60)).await;
        assert!(
            sessions.lookup(&id, &registry).is_some(),
            "used within 30 min"
        );
        tokio::time::advance(Duration::from_secs(29 * 60)).await;
        assert!(
            sessions.lookup(&id, &registry).is_some(),
            "the last use counts"
        );
        tokio::time::advance(Duration::from_secs(30 * 60)).await;
        assert!(
            sessions.lookup(&id, &registry).is_none(),
            "30 min idle ends it"
        );
        assert!(sessions.is_empty(), "an expired session is removed");
    }

    #[tokio::test(start_paused = true)]
    async fn absolute_timeout_ends_a_busy_session() {
        let (sessions, registry) = setup(30 * 60, 12 * 3600);
        let id = sessions.create(Caller::Admin, &registry);
        for _ in 0..(12 * 60 / 20 - 1) {
            tokio::time::advance(Duration::from_secs(20 * 60)).await;
            assert!(sessions.lookup(&id, &registry).is_some());
        }
        tokio::time::advance(Duration::from_secs(20 * 60)).await;
        assert!(
            sessions.lookup(&id, &registry).is_none(),
            "12 h after sign-in"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_cookie_value_is_not_stored_and_a_rotated_key_ends_the_session() {
        let (sessions, registry) = setup(60, 600);
        let acme = AccountId::parse("acme").unwrap();
        let id = sessions.create(Caller::Account(acme.clone()), &registry);
        assert!(sessions.lock().contains_key(&digest(&id)));
        assert!(sessions.lookup("not-a-session", &registry).is_none());
        assert_eq!(
            sessions.lookup(&id, &registry).map(|s| s.caller),
            Some(Caller::Account(acme.clone()))
        );
        let mut account = registry.account(&acme).unwrap();
        account.api_key_hash = [2; 32];
        registry.upsert_account(account);
        assert!(sessions.lookup(&id, &registry).is_none());
    }
}
