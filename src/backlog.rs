//! Per-account backlog: how many deliveries of each account wait for an attempt, and the
//! quota (`delivery.max_scheduled_per_account`) past which that account's ingest is refused.
//!
//! A delivery waits from the moment it is created with a due time until it is delivered, fails
//! for good, or is deleted — exactly while it has a `schedule` entry (its `next_attempt_ms`).
//! Every place that changes that calls in here with one line: fan-out [`Backlog::add`]s what it
//! created, an outcome, a manual retry or a stop reports the old and the new due time to
//! [`Backlog::track`], a webhook deletion [`Backlog::remove`]s the open deliveries it took
//! along (the count `Storage::delete_webhook` reports), and an account deletion
//! [`Backlog::forget`]s the account. The counts live in the registry (every stage that changes
//! a delivery already holds it), behind one std mutex, in memory only: at start-up, after the
//! owed fan-out has run, [`Backlog::rebuild`] recounts them from the stored schedule (webhook
//! → account through the registry). Ingest (`domain::events::check_backlog`) asks
//! [`Backlog::check`] before accepting an account's events, so one account whose endpoints do
//! not keep up gets `429` on its own, instead of filling the engine-wide
//! `delivery.max_scheduled` and making ingest answer 503 for everybody.
//!
//! The quota is checked before events are committed and counted when they are fanned out, so
//! one request (a batch to thousands of webhooks, or the requests in flight at that moment)
//! may take an account past it; the next request is refused. The gauge
//! `kyberhook_accounts_over_backlog_quota` counts the accounts at or over the quota; it is
//! updated under the same lock as the counts, so it never disagrees with them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::ids::{AccountId, DeliveryId, WebhookId};

/// An account at or over its backlog quota.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("account {} has {waiting} deliveries waiting for an attempt (delivery.max_scheduled_per_account = {quota}); retry once its endpoints catch up", .account.as_str())]
pub struct BacklogFull {
    pub account: AccountId,
    pub waiting: u64,
    pub quota: u64,
}

#[derive(Default)]
struct Counts {
    waiting: HashMap<AccountId, u64>,
    /// Accounts whose count is at or over the quota.
    over: usize,
}

pub struct Backlog {
    quota: AtomicU64,
    /// A std mutex: held for a few hash operations, never across an await or a store call.
    counts: Mutex<Counts>,
}

impl Backlog {
    pub fn new(quota: u64) -> Self {
        Backlog {
            quota: AtomicU64::new(quota),
            counts: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn quota(&self) -> u64 {
        self.quota.load(Ordering::Relaxed)
    }

    /// Sets the quota (from the config, at start-up) and recounts the accounts over it.
    pub fn set_quota(&self, quota: u64) {
        let mut counts = self.lock();
        self.quota.store(quota, Ordering::Relaxed);
        counts.over = counts.waiting.values().filter(|n| **n >= quota).count();
        publish(counts.over);
    }

    /// Deliveries of `account` waiting for an attempt.
    pub fn waiting(&self, account: &AccountId) -> u64 {
        self.lock().waiting.get(account).copied().unwrap_or(0)
    }

    /// Accounts at or over the quota (what the gauge shows).
    pub fn over_quota(&self) -> usize {
        self.lock().over
    }

    /// Whether `account` may have more events accepted.
    pub fn check(&self, account: &AccountId) -> Result<(), BacklogFull> {
        let waiting = self.waiting(account);
        let quota = self.quota();
        if waiting >= quota {
            return Err(BacklogFull {
                account: account.clone(),
                waiting,
                quota,
            });
        }
        Ok(())
    }

    /// `n` deliveries of `account` started waiting (created by fan-out, or retried by hand).
    pub fn add(&self, account: &AccountId, n: u64) {
        if n == 0 {
            return;
        }
        let quota = self.quota();
        let mut counts = self.lock();
        let count = counts.waiting.entry(account.clone()).or_insert(0);
        let before = *count;
        *count += n;
        if before < quota && *count >= quota {
            counts.over += 1;
            publish(counts.over);
        }
    }

    /// `n` deliveries of `account` stopped waiting (delivered, failed for good, deleted).
    pub fn remove(&self, account: &AccountId, n: u64) {
        if n == 0 {
            return;
        }
        let quota = self.quota();
        let mut counts = self.lock();
        let Some(count) = counts.waiting.get_mut(account) else {
            return;
        };
        let before = *count;
        *count = count.saturating_sub(n);
        let now = *count;
        if now == 0 {
            counts.waiting.remove(account);
        }
        if before >= quota && now < quota {
            counts.over -= 1;
            publish(counts.over);
        }
    }

    /// A delivery of `account` whose due time went from `old_due` to `new_due`: it started
    /// waiting (`None` → `Some`), stopped (`Some` → `None`), or neither.
    pub fn track(&self, account: &AccountId, old_due: Option<u64>, new_due: Option<u64>) {
        match (old_due.is_some(), new_due.is_some()) {
            (false, true) => self.add(account, 1),
            (true, false) => self.remove(account, 1),
            _ => {}
        }
    }

    /// The account is gone, with its deliveries.
    pub fn forget(&self, account: &AccountId) {
        let quota = self.quota();
        let mut counts = self.lock();
        if counts
            .waiting
            .remove(account)
            .is_some_and(|count| count >= quota)
        {
            counts.over -= 1;
            publish(counts.over);
        }
    }

    /// Replaces every count with a recount of the stored schedule (start-up): each entry is
    /// one waiting delivery, whose account is its webhook's. Entries of webhooks that no
    /// longer exist are not counted (the dispatcher drops them when they fire).
    pub fn rebuild<E>(
        &self,
        schedule: impl IntoIterator<Item = Result<(u64, DeliveryId), E>>,
        account_of: impl Fn(WebhookId) -> Option<AccountId>,
    ) -> Result<(), E> {
        let mut waiting: HashMap<AccountId, u64> = HashMap::new();
        // Consecutive entries of one webhook are common; skip the lookup for them.
        let mut last: Option<(WebhookId, Option<AccountId>)> = None;
        for entry in schedule {
            let (_, id) = entry?;
            let account = match &last {
                Some((hook, account)) if *hook == id.webhook => account.clone(),
                _ => {
                    let account = account_of(id.webhook);
                    last = Some((id.webhook, account.clone()));
                    account
                }
            };
            if let Some(account) = account {
                *waiting.entry(account).or_insert(0) += 1;
            }
        }
        let quota = self.quota();
        let mut counts = self.lock();
        counts.over = waiting.values().filter(|n| **n >= quota).count();
        counts.waiting = waiting;
        publish(counts.over);
        Ok(())
    }
}

impl Backlog {
    /// Replaces the counts of the accounts for which `in_scope` holds with a recount of their
    /// schedule entries `schedule` (a node taking over their partitions); other accounts keep
    /// theirs.
    pub fn recount(
        &self,
        schedule: &[(u64, DeliveryId)],
        account_of: impl Fn(WebhookId) -> Option<AccountId>,
        in_scope: impl Fn(&AccountId) -> bool,
    ) {
        let mut waiting: HashMap<AccountId, u64> = HashMap::new();
        for (_, id) in schedule {
            if let Some(account) = account_of(id.webhook).filter(|a| in_scope(a)) {
                *waiting.entry(account).or_insert(0) += 1;
            }
        }
        let quota = self.quota();
        let mut counts = self.lock();
        counts.waiting.retain(|a, _| !in_scope(a));
        counts.waiting.extend(waiting);
        counts.over = counts.waiting.values().filter(|n| **n >= quota).count();
        publish(counts.over);
    }
}

fn publish(over: usize) {
    metrics::gauge!("kyberhook_accounts_over_backlog_quota").set(over as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acc(s: &str) -> AccountId {
        AccountId::parse(s).unwrap()
    }

    #[test]
    fn counts_cross_the_quota_both_ways() {
        let b = Backlog::new(3);
        let (a, c) = (acc("acc_a"), acc("acc_c"));
        b.add(&a, 2);
        assert!(b.check(&a).is_ok());
        b.track(&a, None, Some(5));
        assert_eq!(b.over_quota(), 1);
        let full = b.check(&a).unwrap_err();
        assert_eq!((full.waiting, full.quota), (3, 3));
        // Another account is untouched; a retry rescheduled (Some → Some) changes nothing.
        assert!(b.check(&c).is_ok());
        b.track(&a, Some(5), Some(9));
        assert_eq!(b.waiting(&a), 3);
        b.track(&a, Some(9), None);
        assert_eq!(b.over_quota(), 0);
        assert!(b.check(&a).is_ok());
        b.add(&a, 10);
        b.add(&c, 4);
        assert_eq!(b.over_quota(), 2);
        b.forget(&a);
        assert_eq!((b.waiting(&a), b.over_quota()), (0, 1));
        b.remove(&c, 100);
        assert_eq!((b.waiting(&c), b.over_quota()), (0, 0));
        b.set_quota(1);
        b.add(&c, 1);
        assert_eq!(b.over_quota(), 1);
    }

    #[test]
    fn rebuild_counts_the_schedule_by_the_webhooks_account() {
        let b = Backlog::new(2);
        b.add(&acc("acc_stale"), 7);
        let id = |seq, hook| DeliveryId {
            seq,
            webhook: WebhookId(hook),
        };
        let schedule = vec![
            Ok::<_, ()>((1, id(1, 1))),
            Ok((2, id(2, 1))),
            Ok((3, id(3, 2))),
            Ok((4, id(4, 9))),
        ];
        b.rebuild(schedule, |hook| match hook.0 {
            1 => Some(acc("acc_a")),
            2 => Some(acc("acc_b")),
            _ => None,
        })
        .unwrap();
        assert_eq!(b.waiting(&acc("acc_a")), 2);
        assert_eq!(b.waiting(&acc("acc_b")), 1);
        assert_eq!(b.waiting(&acc("acc_stale")), 0);
        assert_eq!(b.over_quota(), 1);
    }
}
