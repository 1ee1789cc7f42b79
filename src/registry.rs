//! The in-memory view of accounts and webhooks: API-key lookup, plans, and the subscription
//! index that fan-out consults for every event.
//!
//! Loaded from the store at start-up; the API (and the dispatcher, when it disables a webhook)
//! writes the store first and then updates this view through `upsert_*`/`remove_*`, under
//! [`Registry::write_lock`] so that read-modify-write of a record never interleaves. Readers
//! take a short read lock and get `Arc` snapshots; nothing here is held across an await.
//!
//! A webhook change updates only that webhook's entries of the index (ordered sets, so
//! O(log n) each): an account with thousands of webhooks creates them in linear total time,
//! not by rebuilding its index on every write. The registry also carries the per-account
//! [`Backlog`] counters and the [`FifoGate`] of ordered webhooks, since every stage that
//! changes a delivery already holds the registry; it tells the gate of every webhook change.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use ipnet::IpNet;

use crate::backlog::Backlog;
use crate::fifo::FifoGate;
use crate::ids::{AccountId, WebhookId};
use crate::model::{event_family, Account, Subscription, Webhook, WebhookStatus};

/// A webhook as the pipeline needs it: the record plus its parsed subscriptions and
/// allowlist. Replaced whole on every change, so readers hold a consistent snapshot.
#[derive(Debug)]
pub struct HookEntry {
    pub hook: Webhook,
    pub ip_allowlist: Vec<IpNet>,
}

/// One account's subscriptions, by how they match: a lookup per event is three hash probes,
/// never a scan of the account's webhooks.
#[derive(Debug, Default)]
struct SubIndex {
    exact: HashMap<String, BTreeSet<WebhookId>>,
    family: HashMap<String, BTreeSet<WebhookId>>,
    all: BTreeSet<WebhookId>,
}

impl SubIndex {
    /// Adds (`add`) or removes one webhook's subscriptions.
    fn apply(&mut self, id: WebhookId, events: &[String], catalog: &[String], add: bool) {
        for e in events {
            let set = match Subscription::parse(e, catalog) {
                Some(Subscription::All) => &mut self.all,
                Some(Subscription::Family(f)) => self.family.entry(f).or_default(),
                Some(Subscription::Exact(x)) => self.exact.entry(x).or_default(),
                None => continue,
            };
            if add {
                set.insert(id);
            } else {
                set.remove(&id);
            }
        }
        if !add {
            self.exact.retain(|_, s| !s.is_empty());
            self.family.retain(|_, s| !s.is_empty());
        }
    }
}

#[derive(Debug)]
struct AccountEntry {
    account: Account,
    hooks: BTreeSet<WebhookId>,
    index: SubIndex,
    /// The latest `created_ms` of any webhook the account had, so a new one can be given a
    /// later one without reading them all.
    newest_created_ms: u64,
}

#[derive(Default)]
struct Inner {
    accounts: HashMap<AccountId, AccountEntry>,
    keys: HashMap<[u8; 32], AccountId>,
    hooks: HashMap<WebhookId, Arc<HookEntry>>,
}

pub struct Registry {
    catalog: Vec<String>,
    catalog_set: std::collections::HashSet<String>,
    inner: RwLock<Inner>,
    /// Serialises read-modify-write of account and webhook records (store, then this view).
    /// A std mutex: it is never held across an await.
    writes: Mutex<()>,
    /// Deliveries waiting per account (`delivery.max_scheduled_per_account`).
    backlog: Backlog,
    /// The order of fifo webhooks' deliveries.
    fifo: Arc<FifoGate>,
}

impl Registry {
    pub fn new(catalog: Vec<String>) -> Self {
        Registry {
            catalog_set: catalog.iter().cloned().collect(),
            catalog,
            inner: RwLock::new(Inner::default()),
            writes: Mutex::new(()),
            backlog: Backlog::new(u64::MAX),
            fifo: Arc::new(FifoGate::new()),
        }
    }

    /// The gate of webhooks with `ordering: "fifo"`.
    pub fn fifo(&self) -> &Arc<FifoGate> {
        &self.fifo
    }

    /// The per-account backlog counters.
    pub fn backlog(&self) -> &Backlog {
        &self.backlog
    }

    pub fn catalog(&self) -> &[String] {
        &self.catalog
    }

    /// Whether `event` is an event type of the catalog.
    pub fn is_cataloged(&self, event: &str) -> bool {
        self.catalog_set.contains(event)
    }

    pub fn write_lock(&self) -> MutexGuard<'_, ()> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn account(&self, id: &AccountId) -> Option<Account> {
        self.read().accounts.get(id).map(|a| a.account.clone())
    }

    pub fn account_exists(&self, id: &AccountId) -> bool {
        self.read().accounts.contains_key(id)
    }

    pub fn plan_of(&self, id: &AccountId) -> Option<String> {
        self.read().accounts.get(id).map(|a| a.account.plan.clone())
    }

    pub fn account_by_key(&self, hash: &[u8; 32]) -> Option<AccountId> {
        self.read().keys.get(hash).cloned()
    }

    pub fn hook_count(&self, id: &AccountId) -> usize {
        self.read().accounts.get(id).map_or(0, |a| a.hooks.len())
    }

    /// The latest `created_ms` among the account's webhooks (0 when it has had none).
    pub fn newest_hook_created_ms(&self, id: &AccountId) -> u64 {
        self.read()
            .accounts
            .get(id)
            .map_or(0, |a| a.newest_created_ms)
    }

    pub fn hook(&self, id: WebhookId) -> Option<Arc<HookEntry>> {
        self.read().hooks.get(&id).cloned()
    }

    pub fn upsert_account(&self, account: Account) {
        let mut inner = self.write();
        let inner = &mut *inner;
        if let Some(old) = inner.accounts.get_mut(&account.id) {
            inner.keys.remove(&old.account.api_key_hash);
            inner.keys.insert(account.api_key_hash, account.id.clone());
            old.account = account;
        } else {
            inner.keys.insert(account.api_key_hash, account.id.clone());
            inner.accounts.insert(
                account.id.clone(),
                AccountEntry {
                    account,
                    hooks: BTreeSet::new(),
                    index: SubIndex::default(),
                    newest_created_ms: 0,
                },
            );
        }
    }

    pub fn remove_account(&self, id: &AccountId) {
        let mut inner = self.write();
        self.backlog.forget(id);
        if let Some(entry) = inner.accounts.remove(id) {
            inner.keys.remove(&entry.account.api_key_hash);
            for hook in entry.hooks {
                inner.hooks.remove(&hook);
                self.fifo.remove_webhook(hook);
            }
        }
    }

    /// The distinct IP allowlists the webhooks use (the outbound client pools one client per
    /// allowlist; the others can go).
    pub fn allowlists_in_use(&self) -> Vec<Vec<ipnet::IpNet>> {
        let mut lists: Vec<Vec<ipnet::IpNet>> = Vec::new();
        for entry in self.read().hooks.values() {
            if !entry.ip_allowlist.is_empty() && !lists.contains(&entry.ip_allowlist) {
                lists.push(entry.ip_allowlist.clone());
            }
        }
        lists
    }

    /// How many webhooks are active, paused and disabled (in that order): for the metrics
    /// page, at scrape time. One pass over the webhooks under the read lock.
    pub fn hook_status_counts(&self) -> [usize; 3] {
        let mut counts = [0; 3];
        for entry in self.read().hooks.values() {
            counts[match entry.hook.status {
                WebhookStatus::Active => 0,
                WebhookStatus::Paused => 1,
                WebhookStatus::Disabled => 2,
            }] += 1;
        }
        counts
    }

    pub fn upsert_hook(&self, hook: Webhook) {
        let mut inner = self.write();
        self.put_hook(&mut inner, hook);
    }

    /// Stores a webhook and moves its index entries from its old subscriptions to its new
    /// ones: O(subscriptions × log n), whatever the number of webhooks of the account.
    fn put_hook(&self, inner: &mut Inner, hook: Webhook) {
        let ip_allowlist = hook
            .ip_allowlist
            .iter()
            .filter_map(|c| crate::config::parse_cidr(c).ok())
            .collect();
        let account = hook.account_id.clone();
        let id = hook.id;
        let created_ms = hook.created_ms;
        let entry = Arc::new(HookEntry { hook, ip_allowlist });
        self.fifo.configure(&entry.hook);
        let old = inner.hooks.insert(id, entry.clone());
        if let Some(acc) = inner.accounts.get_mut(&account) {
            if let Some(old) = &old {
                acc.index.apply(id, &old.hook.events, &self.catalog, false);
            }
            acc.index.apply(id, &entry.hook.events, &self.catalog, true);
            acc.hooks.insert(id);
            acc.newest_created_ms = acc.newest_created_ms.max(created_ms);
        }
    }

    pub fn remove_hook(&self, account: &AccountId, id: WebhookId) {
        let mut inner = self.write();
        let old = inner.hooks.remove(&id);
        self.fifo.remove_webhook(id);
        if let Some(acc) = inner.accounts.get_mut(account) {
            acc.hooks.remove(&id);
            if let Some(old) = old {
                acc.index.apply(id, &old.hook.events, &self.catalog, false);
            }
        }
    }

    /// Whether any active webhook of `account` is subscribed to `event`.
    pub fn has_subscriber(&self, account: &AccountId, event: &str) -> bool {
        let inner = self.read();
        let Some(entry) = inner.accounts.get(account) else {
            return false;
        };
        let idx = &entry.index;
        idx.exact
            .get(event)
            .into_iter()
            .flatten()
            .chain(idx.family.get(event_family(event)).into_iter().flatten())
            .chain(idx.all.iter())
            .any(|id| {
                inner
                    .hooks
                    .get(id)
                    .is_some_and(|h| h.hook.status == WebhookStatus::Active)
            })
    }

    /// The active webhooks of `account` subscribed to `event`, each once.
    pub fn matching(&self, account: &AccountId, event: &str) -> Vec<Arc<HookEntry>> {
        let inner = self.read();
        let Some(entry) = inner.accounts.get(account) else {
            return Vec::new();
        };
        let idx = &entry.index;
        let mut ids: Vec<WebhookId> = idx
            .exact
            .get(event)
            .into_iter()
            .flatten()
            .chain(idx.family.get(event_family(event)).into_iter().flatten())
            .chain(idx.all.iter())
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.iter()
            .filter_map(|id| inner.hooks.get(id))
            .filter(|h| h.hook.status == WebhookStatus::Active)
            .cloned()
            .collect()
    }

    /// Loads every account and webhook (start-up).
    /// Makes the accounts for which `in_scope` holds, and their webhooks, exactly `accounts`
    /// and `hooks` as stored (a node sharing the store takes in what other nodes changed):
    /// records that differ are replaced, those gone are removed, and the rest are left alone,
    /// so their subscription index and FIFO queues are not rebuilt. Returns how many changed.
    ///
    /// `read` reads the store under the registry's write lock, so that a change this node
    /// makes meanwhile (store, then this view) cannot be overwritten by an older read.
    pub fn sync<E>(
        &self,
        read: impl FnOnce() -> Result<(Vec<Account>, Vec<Webhook>), E>,
        in_scope: impl Fn(&AccountId) -> bool,
    ) -> Result<usize, E> {
        let _writes = self.write_lock();
        let (accounts, hooks) = read()?;
        let (known_accounts, known_hooks): (HashSet<AccountId>, HashSet<(AccountId, WebhookId)>) = {
            let inner = self.read();
            (
                inner
                    .accounts
                    .keys()
                    .filter(|a| in_scope(a))
                    .cloned()
                    .collect(),
                inner
                    .hooks
                    .values()
                    .filter(|h| in_scope(&h.hook.account_id))
                    .map(|h| (h.hook.account_id.clone(), h.hook.id))
                    .collect(),
            )
        };
        let mut changed = 0;
        let mut stored_accounts = HashSet::new();
        for a in accounts.into_iter().filter(|a| in_scope(&a.id)) {
            stored_accounts.insert(a.id.clone());
            if self.account(&a.id).as_ref() != Some(&a) {
                self.upsert_account(a);
                changed += 1;
            }
        }
        let mut stored_hooks = HashSet::new();
        for h in hooks
            .into_iter()
            .filter(|h| in_scope(&h.account_id) && stored_accounts.contains(&h.account_id))
        {
            stored_hooks.insert(h.id);
            if self.hook(h.id).map_or(true, |e| e.hook != h) {
                self.upsert_hook(h);
                changed += 1;
            }
        }
        for (account, id) in known_hooks {
            if !stored_hooks.contains(&id) {
                self.remove_hook(&account, id);
                changed += 1;
            }
        }
        for account in known_accounts {
            if !stored_accounts.contains(&account) {
                self.remove_account(&account);
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// The webhooks of the accounts for which `in_scope` holds.
    pub fn hooks_where(&self, in_scope: impl Fn(&AccountId) -> bool) -> Vec<Webhook> {
        self.read()
            .hooks
            .values()
            .filter(|h| in_scope(&h.hook.account_id))
            .map(|h| h.hook.clone())
            .collect()
    }

    pub fn load(&self, accounts: Vec<Account>, hooks: Vec<Webhook>) {
        for a in accounts {
            self.upsert_account(a);
        }
        let mut inner = self.write();
        for h in hooks {
            self.put_hook(&mut inner, h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(id: u64, account: &AccountId, events: &[&str], status: WebhookStatus) -> Webhook {
        Webhook {
            id: WebhookId(id),
            account_id: account.clone(),
            name: "h".into(),
            url: "https://example.com/".into(),
            description: None,
            events: events.iter().map(|s| s.to_string()).collect(),
            ip_allowlist: vec![],
            status,
            disabled_reason: None,
            consecutive_failures: 0,
            secret: "whsec_x".into(),
            signature_scheme: Default::default(),
            previous_secret: None,
            rotation_ends_ms: None,
            ordering: Default::default(),
            max_concurrency: None,
            created_ms: 0,
            updated_ms: 0,
        }
    }

    #[test]
    fn matching_uses_exact_family_and_wildcard_and_skips_inactive() {
        let catalog: Vec<String> = crate::config::DEFAULT_EVENT_CATALOG
            .iter()
            .map(|s| s.to_string())
            .collect();
        let reg = Registry::new(catalog);
        let a = AccountId::parse("acc_a").unwrap();
        let b = AccountId::parse("acc_b").unwrap();
        for acc in [&a, &b] {
            reg.upsert_account(Account {
                id: acc.clone(),
                name: "n".into(),
                plan: "starter".into(),
                created_ms: 0,
                api_key_hash: crate::signing::hash_api_key(acc.as_str()),
            });
        }
        reg.upsert_hook(hook(1, &a, &["visitor.checked_in"], WebhookStatus::Active));
        reg.upsert_hook(hook(
            2,
            &a,
            &["visitor.*", "visitor.checked_in"],
            WebhookStatus::Active,
        ));
        reg.upsert_hook(hook(3, &a, &["*"], WebhookStatus::Active));
        reg.upsert_hook(hook(4, &a, &["*"], WebhookStatus::Paused));
        reg.upsert_hook(hook(5, &b, &["*"], WebhookStatus::Active));
        let ids = |acc: &AccountId, ev: &str| {
            let mut v: Vec<u64> = reg.matching(acc, ev).iter().map(|h| h.hook.id.0).collect();
            v.sort();
            v
        };
        assert_eq!(ids(&a, "visitor.checked_in"), vec![1, 2, 3]);
        for ev in [
            "visitor.checked_in",
            "user.login",
            "emergency.lockdown_activated",
        ] {
            assert_eq!(reg.has_subscriber(&a, ev), !ids(&a, ev).is_empty(), "{ev}");
        }
        assert!(!reg.has_subscriber(&AccountId::parse("acc_none").unwrap(), "user.login"));
        assert_eq!(ids(&a, "visitor.checked_out"), vec![2, 3]);
        assert_eq!(ids(&a, "user.login"), vec![3]);
        assert_eq!(ids(&b, "user.login"), vec![5]);
        reg.upsert_hook(hook(3, &a, &["user.*"], WebhookStatus::Active));
        assert_eq!(ids(&a, "visitor.checked_out"), vec![2]);
        reg.remove_hook(&a, WebhookId(2));
        assert_eq!(ids(&a, "visitor.checked_in"), vec![1]);
        assert_eq!(reg.hook_count(&a), 3);
        // Only a paused catch-all left for user.login: no active subscriber.
        reg.upsert_hook(hook(3, &a, &["visitor.*"], WebhookStatus::Active));
        assert!(!reg.has_subscriber(&a, "user.login"));
        reg.remove_account(&a);
        assert!(ids(&a, "user.login").is_empty());
        assert!(reg.hook(WebhookId(1)).is_none());
        assert_eq!(ids(&b, "user.login"), vec![5]);
    }
}
