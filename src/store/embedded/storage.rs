//! The embedded store as the engine sees it: [`Storage`] for [`SledStore`], each method the
//! inherent one of the same name (spread over this folder by concern) with its error turned
//! into the boundary's [`StoreError`].

use std::sync::Arc;

use super::backup::BackupError;
use super::SledStore;
use crate::ids::{AccountId, DeliveryId, WebhookId};
use crate::model::{Account, AttemptRecord, DeliveryRecord, EventRecord, Webhook};
use crate::stats::{AttemptStat, Counts};
use crate::store::{
    BackupStream, DeliveryPage, DeliveryQuery, DeliveryWrites, PurgeCursor, PurgePlan, PurgedBatch,
    Result, Storage, StoreError,
};

impl Storage for SledStore {
    fn make_durable(&self) -> Result<()> {
        Ok(SledStore::make_durable(self)?)
    }
    fn health(&self) -> Result<()> {
        SledStore::health(self)
    }
    fn probe_write(&self) -> Result<()> {
        Ok(SledStore::probe_write(self)?)
    }
    fn size_on_disk(&self) -> u64 {
        SledStore::size_on_disk(self)
    }
    fn live(&self) -> &crate::stats::live::Live {
        SledStore::live(self)
    }

    fn put_account(&self, account: &Account) -> Result<()> {
        Ok(SledStore::put_account(self, account)?)
    }
    fn get_account(&self, id: &AccountId) -> Result<Option<Account>> {
        Ok(SledStore::get_account(self, id)?)
    }
    fn all_accounts(&self) -> Result<Vec<Account>> {
        Ok(SledStore::all_accounts(self)?)
    }
    fn delete_account(&self, account: &Account) -> Result<()> {
        Ok(SledStore::delete_account(self, account)?)
    }
    fn put_webhook(&self, hook: &Webhook) -> Result<()> {
        Ok(SledStore::put_webhook(self, hook)?)
    }
    fn get_webhook(&self, account: &AccountId, id: WebhookId) -> Result<Option<Webhook>> {
        Ok(SledStore::get_webhook(self, account, id)?)
    }
    fn webhooks_of(&self, account: &AccountId) -> Result<Vec<Webhook>> {
        Ok(SledStore::webhooks_of(self, account)?)
    }
    fn all_webhooks(&self) -> Result<Vec<Webhook>> {
        Ok(SledStore::all_webhooks(self)?)
    }
    fn delete_webhook(&self, hook: &Webhook) -> Result<u64> {
        Ok(SledStore::delete_webhook(self, hook)?)
    }

    fn last_seq(&self) -> Result<u64> {
        Ok(SledStore::last_seq(self)?)
    }
    fn event_seq(&self, account: &AccountId, event_id: &str) -> Result<Option<u64>> {
        Ok(SledStore::event_seq(self, account, event_id)?)
    }
    fn append_events(&self, events: &[EventRecord]) -> Result<()> {
        Ok(SledStore::append_events(self, events)?)
    }
    fn append_events_owing(&self, events: &[EventRecord], owes_fanout: &[bool]) -> Result<()> {
        Ok(SledStore::append_events_owing(self, events, owes_fanout)?)
    }
    fn get_event(&self, seq: u64) -> Result<Option<EventRecord>> {
        Ok(SledStore::get_event(self, seq)?)
    }
    fn inbox(&self) -> Result<Vec<u64>> {
        Ok(SledStore::inbox(self)?)
    }
    fn clear_inbox(&self, seqs: &[u64]) -> Result<()> {
        Ok(SledStore::clear_inbox(self, seqs)?)
    }

    fn get_delivery(&self, id: DeliveryId) -> Result<Option<DeliveryRecord>> {
        Ok(SledStore::get_delivery(self, id)?)
    }
    fn attempts(&self, id: DeliveryId) -> Result<Vec<AttemptRecord>> {
        Ok(SledStore::attempts(self, id)?)
    }
    fn scheduled(&self) -> Box<dyn Iterator<Item = Result<(u64, DeliveryId)>> + '_> {
        Box::new(SledStore::scheduled(self).map(|r| r.map_err(StoreError::from)))
    }
    fn earliest_due_ms(&self) -> Result<Option<u64>> {
        Ok(SledStore::earliest_due_ms(self)?)
    }
    fn list_deliveries(&self, account: &AccountId, q: &DeliveryQuery) -> Result<DeliveryPage> {
        Ok(SledStore::list_deliveries(self, account, q)?)
    }
    fn webhook_deliveries(
        &self,
        webhook: WebhookId,
        keep: &dyn Fn(&DeliveryRecord) -> bool,
    ) -> Result<Vec<DeliveryRecord>> {
        Ok(SledStore::webhook_deliveries(self, webhook, keep)?)
    }
    fn apply_delivery_writes(&self, writes: &DeliveryWrites) -> Result<()> {
        Ok(SledStore::apply_delivery_writes(self, writes)?)
    }

    fn is_held(&self, id: DeliveryId) -> bool {
        SledStore::is_held(self, id)
    }
    fn held_delivery(&self, id: DeliveryId) -> Option<DeliveryRecord> {
        SledStore::held_delivery(self, id)
    }
    fn hold_delivery(&self, record: DeliveryRecord) {
        SledStore::hold_delivery(self, record)
    }
    fn release_held(&self, id: DeliveryId) -> Option<DeliveryRecord> {
        SledStore::release_held(self, id)
    }

    fn add_stats(&self, attempts: &[AttemptStat]) -> Result<()> {
        Ok(SledStore::add_stats(self, attempts)?)
    }
    fn webhook_stats(&self, webhook: WebhookId, first_hour: u64) -> Result<Vec<(u64, Counts)>> {
        Ok(SledStore::webhook_stats(self, webhook, first_hour)?)
    }
    fn put_session(&self, key: &[u8; 32], session: &str) -> Result<()> {
        Ok(SledStore::put_session(self, key, session)?)
    }
    fn remove_session(&self, key: &[u8; 32]) -> Result<()> {
        Ok(SledStore::remove_session(self, key)?)
    }
    fn sessions(&self) -> Result<Vec<([u8; 32], String)>> {
        Ok(SledStore::sessions(self)?)
    }

    fn plan_purge(&self, cutoff_ms: u64, after: Option<&PurgeCursor>) -> Result<PurgePlan> {
        Ok(SledStore::plan_purge(self, cutoff_ms, after)?)
    }
    fn apply_purge(&self, plan: &PurgePlan) -> Result<PurgedBatch> {
        Ok(SledStore::apply_purge(self, plan)?)
    }
    fn purge_events(
        &self,
        cutoff_ms: u64,
        after: Option<&PurgeCursor>,
    ) -> Result<(usize, Option<PurgeCursor>)> {
        Ok(SledStore::purge_events(self, cutoff_ms, after)?)
    }
    fn purge_stats_before(&self, cutoff_ms: u64) -> Result<usize> {
        Ok(SledStore::purge_stats_before(self, cutoff_ms)?)
    }

    fn begin_backup(self: Arc<Self>) -> std::result::Result<Box<dyn BackupStream>, BackupError> {
        Ok(Box::new(SledStore::begin_backup(&self)?))
    }
}
