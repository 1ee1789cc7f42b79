//! The store's side of delivery statistics (tree `stats`, see [`crate::stats`]) and of
//! dashboard sessions (tree `sessions`, see `ui::session`).
//!
//! Statistics enter from the delivery writer's drains (`SledStore::apply_delivery_writes` calls
//! [`SledStore::add_stats`]): one read-modify-write per (webhook, hour) per drain, on the writer
//! thread, which is the only writer of the current hours. Retention drops the buckets of hours
//! that ended before its cutoff ([`SledStore::purge_stats_before`]); deleting a webhook drops its
//! buckets. Sessions are stored sealed with the secrets key (the associated data names the
//! session's key), so a copy of the data dir shows no session's CSRF token or owner.

use std::sync::atomic::Ordering;

use super::tracked::Batch;
use super::{keys, Result, SledStore};
use crate::codec;
use crate::ids::WebhookId;
use crate::stats::{self, AttemptStat, Counts, HOUR_MS};

/// What a sealed session value is bound to, besides its key.
const SESSION_CONTEXT: &[u8] = b"ui-session:";

impl SledStore {
    /// The engine's figures of the last hour (in memory).
    pub fn live(&self) -> &stats::live::Live {
        &self.live
    }

    /// Adds a drain's attempt statistics to their webhooks' hourly buckets.
    pub fn add_stats(&self, attempts: &[AttemptStat]) -> Result<()> {
        if attempts.is_empty() {
            return Ok(());
        }
        self.live.count(attempts);
        let mut batch = Batch::default();
        for ((webhook, hour), add) in stats::aggregate(attempts) {
            let key = keys::stats(webhook, hour);
            let mut counts: Counts = match self.stats.get(key)? {
                Some(v) => codec::decode(&v)?,
                None => Counts::default(),
            };
            counts.merge(&add);
            batch.insert(&key, codec::encode(&counts));
        }
        self.stats.write_in_order(batch)?;
        Ok(())
    }

    /// A webhook's stored hourly buckets from `first_hour` (unix hours) on, oldest first.
    pub fn webhook_stats(&self, webhook: WebhookId, first_hour: u64) -> Result<Vec<(u64, Counts)>> {
        let lo = keys::stats(webhook, first_hour);
        let hi = keys::stats(webhook, u64::MAX);
        self.stats
            .range(lo..=hi)
            .map(|kv| {
                let (k, v) = kv?;
                let hour = keys::stats_parts(&k).map_or(0, |(_, h)| h);
                Ok((hour, codec::decode(&v)?))
            })
            .collect()
    }

    /// Drops every bucket of an hour that ended before `cutoff_ms`; how many went. Runs at most
    /// once per hour of cutoff (buckets are hours): one seek per webhook with statistics.
    pub fn purge_stats_before(&self, cutoff_ms: u64) -> Result<usize> {
        let cutoff_hour = cutoff_ms / HOUR_MS;
        if self.stats_purged_hour.load(Ordering::Relaxed) >= cutoff_hour && cutoff_hour > 0 {
            return Ok(0);
        }
        let mut removed = 0;
        let mut from = keys::stats(WebhookId(0), 0);
        loop {
            let Some(kv) = self.stats.range(from..).next() else {
                break;
            };
            let (k, _) = kv?;
            let Some((webhook, _)) = keys::stats_parts(&k) else {
                break;
            };
            let mut batch = Batch::default();
            for k in self
                .stats
                .range(keys::stats(webhook, 0)..keys::stats(webhook, cutoff_hour))
                .keys()
            {
                batch.remove(k?);
                removed += 1;
            }
            self.stats.write_in_order(batch)?;
            match webhook.0.checked_add(1) {
                Some(next) => from = keys::stats(WebhookId(next), 0),
                None => break,
            }
        }
        self.stats_purged_hour.store(cutoff_hour, Ordering::Relaxed);
        Ok(removed)
    }

    /// Drops a webhook's statistics (with its delivery history).
    pub(super) fn delete_webhook_stats(&self, webhook: WebhookId) -> Result<()> {
        let mut batch = Batch::default();
        for k in self
            .stats
            .scan_prefix(keys::by_webhook_prefix(webhook))
            .keys()
        {
            batch.remove(k?);
        }
        self.stats.write_in_order(batch)?;
        Ok(())
    }

    // ---- dashboard sessions ----

    fn session_context(key: &[u8; 32]) -> Vec<u8> {
        let mut context = SESSION_CONTEXT.to_vec();
        context.extend_from_slice(key);
        context
    }

    /// Stores a session (its serialised form) sealed under `key`, the SHA-256 of its cookie.
    pub fn put_session(&self, key: &[u8; 32], session: &str) -> Result<()> {
        let sealed = self.sealer.seal(session, &Self::session_context(key));
        self.sessions.insert(key, sealed.as_bytes())?;
        Ok(())
    }

    pub fn remove_session(&self, key: &[u8; 32]) -> Result<()> {
        self.sessions.remove(key)?;
        Ok(())
    }

    /// Every stored session, opened. One that does not open (damaged) is dropped.
    pub fn sessions(&self) -> Result<Vec<([u8; 32], String)>> {
        let mut out = Vec::new();
        for kv in self.sessions.iter() {
            let (k, v) = kv?;
            let Ok(key) = <[u8; 32]>::try_from(k.as_ref()) else {
                self.sessions.remove(k)?;
                continue;
            };
            let opened = std::str::from_utf8(&v)
                .ok()
                .and_then(|text| self.sealer.open(text, &Self::session_context(&key)).ok());
            match opened {
                Some(session) => out.push((key, session)),
                None => {
                    self.sessions.remove(k)?;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Outcome;

    fn stat(hook: u64, at_ms: u64, outcome: Outcome, ms: u64) -> AttemptStat {
        AttemptStat {
            webhook: WebhookId(hook),
            at_ms,
            outcome,
            response_time_ms: ms,
        }
    }

    #[test]
    fn stats_add_up_survive_a_reopen_and_follow_retention_and_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let h = |n: u64| n * HOUR_MS;
        {
            let store = SledStore::open(dir.path(), false).unwrap();
            store
                .add_stats(&[
                    stat(7, h(10), Outcome::Delivered, 5),
                    stat(7, h(10) + 9, Outcome::Failed, 50),
                    stat(7, h(12), Outcome::Retrying, 8),
                    stat(8, h(10), Outcome::Delivered, 1),
                ])
                .unwrap();
            store
                .add_stats(&[stat(7, h(10) + 1, Outcome::Delivered, 7)])
                .unwrap();
            store.make_durable().unwrap();
        }
        let store = SledStore::open(dir.path(), false).unwrap();
        let got = store.webhook_stats(WebhookId(7), 0).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, 10);
        assert_eq!(
            (got[0].1.delivered, got[0].1.failed, got[0].1.retrying),
            (2, 1, 0)
        );
        assert_eq!(got[0].1.latency.count(), 3);
        assert_eq!(store.webhook_stats(WebhookId(7), 11).unwrap().len(), 1);
        // Hours that ended before the cutoff go; the hour the cutoff falls in stays.
        assert_eq!(store.purge_stats_before(h(12) + 5).unwrap(), 2);
        assert_eq!(store.webhook_stats(WebhookId(7), 0).unwrap()[0].0, 12);
        assert!(store.webhook_stats(WebhookId(8), 0).unwrap().is_empty());
        store.delete_webhook_stats(WebhookId(7)).unwrap();
        assert!(store.webhook_stats(WebhookId(7), 0).unwrap().is_empty());
    }

    #[test]
    fn sessions_are_stored_sealed_and_open_again_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = [3u8; 32];
        {
            let store = SledStore::open(dir.path(), false).unwrap();
            store
                .put_session(&key, "{\"csrf\":\"visible-token\"}")
                .unwrap();
            let raw = store.sessions.get(key).unwrap().unwrap();
            assert!(!String::from_utf8_lossy(&raw).contains("visible-token"));
            // A value moved under another key does not open.
            store.sessions.insert([4u8; 32], raw).unwrap();
            store.make_durable().unwrap();
        }
        let store = SledStore::open(dir.path(), false).unwrap();
        let all = store.sessions().unwrap();
        assert_eq!(all, vec![(key, "{\"csrf\":\"visible-token\"}".to_string())]);
        assert!(store.sessions.get([4u8; 32]).unwrap().is_none());
        store.remove_session(&key).unwrap();
        assert!(store.sessions().unwrap().is_empty());
    }
}
