//! Dashboard sessions, held in memory: who signed in (an account or the operator), the
//! session's CSRF token and a one-shot notice for the next page.
//!
//! A session enters at sign-in ([`Sessions::create`] returns the random id for the cookie) and
//! is found again by that id on every request ([`Sessions::lookup`]); only the id's SHA-256 is
//! kept, so the map never holds a usable cookie. A session ends after `session_idle` unused or
//! `session_absolute` after sign-in (both read from the engine clock, so tests can move time),
//! at logout, or when the account's API key changes or the account is deleted. The map is
//! bounded: at [`MAX_SESSIONS`] the least recently used session goes first. It sits behind a
//! std mutex, never held across an await; the expiry rules are unit-tested under paused
//! tokio time.
//!
//! Sessions survive a restart: a [`Sessions::persistent`] map writes each session through to the
//! store (tree `sessions`, sealed with the secrets key under the id's SHA-256) when it starts,
//! ends, or has been used again after [`TOUCH_EVERY_MS`], and loads the live ones at start-up;
//! the same expiry and API-key checks apply to a loaded session. Notices stay in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock;
use crate::config::UiLimits;
use crate::domain::caller::Caller;
use crate::ids::AccountId;
use crate::registry::Registry;
use crate::store::Storage;

/// Sessions held at once.
pub const MAX_SESSIONS: usize = 10_000;

/// How stale the stored last use of a session may get: a use is written through only this
/// long after the last one written, so a busy session costs a store write a minute, not one
/// per request (an idle limit is minutes to hours; this much of it may be lost at a restart).
pub const TOUCH_EVERY_MS: u64 = 60_000;

/// A session as stored (sealed by the store).
#[derive(Serialize, Deserialize)]
struct Stored {
    /// `None`: the operator.
    account: Option<AccountId>,
    csrf: String,
    key_hash: Option<[u8; 32]>,
    created_ms: u64,
    last_ms: u64,
    /// The pending one-shot notice. Written through when set or shown only where nodes share
    /// sessions: a change relayed to the node that serves the account leaves its notice
    /// there, for the node that shows the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    notice: Option<String>,
}

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
    /// The last use written to the store.
    saved_ms: u64,
    notice: Option<String>,
}

impl Entry {
    fn stored(&self) -> String {
        let stored = Stored {
            account: match &self.session.caller {
                Caller::Admin => None,
                Caller::Account(a) => Some(a.clone()),
            },
            csrf: self.session.csrf.clone(),
            key_hash: self.key_hash,
            created_ms: self.created_ms,
            last_ms: self.last_ms,
            notice: self.notice.clone(),
        };
        serde_json::to_string(&stored).expect("a session serialises")
    }
}

pub struct Sessions {
    /// One std mutex: every operation is a short map update, never held across an await.
    entries: Mutex<HashMap<[u8; 32], Entry>>,
    idle_ms: u64,
    absolute_ms: u64,
    /// Where sessions are written through (none: memory only, as in unit tests).
    store: Option<Arc<dyn Storage>>,
}

impl Entry {
    /// A session as stored ([`Entry::stored`]).
    fn from_stored(text: &str) -> Option<Entry> {
        serde_json::from_str::<Stored>(text).ok().map(|s| Entry {
            session: Session {
                caller: s.account.map_or(Caller::Admin, Caller::Account),
                csrf: s.csrf,
            },
            key_hash: s.key_hash,
            created_ms: s.created_ms,
            last_ms: s.last_ms,
            saved_ms: s.last_ms,
            notice: s.notice,
        })
    }
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
            store: None,
        }
    }

    /// Sessions written through to `store`, starting with the live ones it holds (expired or
    /// unreadable ones are removed from it).
    pub fn persistent(limits: &UiLimits, store: Arc<dyn Storage>) -> Self {
        let mut sessions = Sessions::new(limits);
        let now = clock::now_ms();
        let stored = store.sessions().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the stored dashboard sessions failed; everyone signs in again");
            Vec::new()
        });
        let (idle_ms, absolute_ms) = (sessions.idle_ms, sessions.absolute_ms);
        let map = sessions
            .entries
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (key, text) in stored {
            match Entry::from_stored(&text) {
                Some(e)
                    if map.len() < MAX_SESSIONS
                        && now.saturating_sub(e.last_ms) < idle_ms
                        && now.saturating_sub(e.created_ms) < absolute_ms =>
                {
                    map.insert(key, e);
                }
                _ => {
                    let _ = store.remove_session(&key);
                }
            }
        }
        sessions.store = Some(store);
        sessions
    }

    fn save(&self, key: &[u8; 32], entry: &Entry) {
        self.put(key, &entry.stored());
    }

    fn put(&self, key: &[u8; 32], text: &str) {
        if let Some(store) = &self.store {
            if let Err(e) = store.put_session(key, text) {
                tracing::warn!(error = %e, "storing a dashboard session failed; it ends at the next restart");
            }
        }
    }

    fn forget(&self, key: &[u8; 32]) {
        if let Some(store) = &self.store {
            if let Err(e) = store.remove_session(key) {
                tracing::warn!(error = %e, "removing a stored dashboard session failed");
            }
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
            saved_ms: now,
            notice: None,
        };
        let key = digest(&id);
        self.save(&key, &entry);
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            let expired: Vec<[u8; 32]> = map
                .iter()
                .filter(|(_, e)| !self.live(e, now))
                .map(|(k, _)| *k)
                .collect();
            for k in expired {
                map.remove(&k);
                self.forget(&k);
            }
        }
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, e)| e.last_ms).map(|(k, _)| *k) {
                map.remove(&oldest);
                self.forget(&oldest);
            }
        }
        map.insert(key, entry);
        id
    }

    /// The live session `id` names, marked as used now; an expired or revoked one is removed.
    pub fn lookup(&self, id: &str, registry: &Registry) -> Option<Session> {
        let key = digest(id);
        let now = clock::now_ms();
        // Shared with other nodes: the stored session is the truth (begun or ended there).
        let stored = match &self.store {
            Some(store) if store.shares_sessions() => Some(match store.session(&key) {
                Ok(s) => s.and_then(|text| Entry::from_stored(&text)),
                Err(e) => {
                    tracing::warn!(error = %e, "reading a dashboard session failed");
                    None
                }
            }),
            _ => None,
        };
        let mut map = self.lock();
        match stored {
            Some(None) => {
                map.remove(&key);
                return None;
            }
            Some(Some(mut fresh)) => {
                // The stored session is the whole truth, its notice included (set, or
                // already shown, by whichever node); only the last use may be newer here.
                if let Some(old) = map.get(&key) {
                    fresh.last_ms = fresh.last_ms.max(old.last_ms);
                }
                map.insert(key, fresh);
            }
            None => {}
        }
        let entry = map.get_mut(&key)?;
        let still_valid = match &entry.session.caller {
            Caller::Admin => true,
            Caller::Account(a) => registry
                .account(a)
                .is_some_and(|acc| Some(acc.api_key_hash) == entry.key_hash),
        };
        if !still_valid || !self.live(entry, now) {
            map.remove(&key);
            self.forget(&key);
            return None;
        }
        entry.last_ms = now;
        if now.saturating_sub(entry.saved_ms) >= TOUCH_EVERY_MS {
            entry.saved_ms = now;
            self.save(&key, entry);
        }
        Some(entry.session.clone())
    }

    /// Leaves a notice for the next page this session shows.
    pub fn set_notice(&self, id: &str, notice: impl Into<String>) {
        let key = digest(id);
        let stored = {
            let mut map = self.lock();
            let Some(e) = map.get_mut(&key) else {
                return;
            };
            e.notice = Some(notice.into());
            self.shared().then(|| e.stored())
        };
        // Written outside the lock: other requests' lookups do not wait on the database.
        if let Some(text) = stored {
            self.put(&key, &text);
        }
    }

    pub fn take_notice(&self, id: &str) -> Option<String> {
        let key = digest(id);
        let (notice, stored) = {
            let mut map = self.lock();
            let e = map.get_mut(&key)?;
            let notice = e.notice.take();
            let stored = (notice.is_some() && self.shared()).then(|| e.stored());
            (notice, stored)
        };
        if let Some(text) = stored {
            self.put(&key, &text);
        }
        notice
    }

    /// Whether other nodes read these sessions from the store (nodes dividing the work).
    fn shared(&self) -> bool {
        self.store.as_ref().is_some_and(|s| s.shares_sessions())
    }

    pub fn remove(&self, id: &str) {
        let key = digest(id);
        self.lock().remove(&key);
        self.forget(&key);
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
    use crate::store::embedded::SledStore;

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
    async fn stored_sessions_come_back_until_they_expire_or_end() {
        let (_, registry) = setup(60, 3600);
        let limits = UiLimits {
            session_idle: Duration::from_secs(60),
            session_absolute: Duration::from_secs(3600),
            login_attempts_per_minute: 10,
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), false).unwrap());
        let acme = AccountId::parse("acme").unwrap();
        let sessions = Sessions::persistent(&limits, store.clone());
        let kept = sessions.create(Caller::Account(acme.clone()), &registry);
        let ended = sessions.create(Caller::Admin, &registry);
        let csrf = sessions.lookup(&kept, &registry).unwrap().csrf;
        sessions.remove(&ended);
        // A restart: a new map from the store.
        let again = Sessions::persistent(&limits, store.clone());
        let s = again.lookup(&kept, &registry).expect("survives");
        assert_eq!((s.caller, s.csrf), (Caller::Account(acme), csrf));
        assert!(
            again.lookup(&ended, &registry).is_none(),
            "signed out stays out"
        );
        // Idle past the limit: not loaded, and removed from the store.
        tokio::time::advance(Duration::from_secs(61)).await;
        let later = Sessions::persistent(&limits, store.clone());
        assert!(later.is_empty());
        assert!(store.sessions().unwrap().is_empty());
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
        // A second more: the engine clock's base is process-wide, and a test running
        // alongside may set it a moment after this runtime's paused clock started.
        tokio::time::advance(Duration::from_secs(20 * 60 + 1)).await;
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
