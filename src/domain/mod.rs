//! The domain layer: every business rule of accounts, webhooks, deliveries and events, written
//! once and called by both front ends — the JSON `/v1` handlers (`crate::api`) and the
//! dashboard (`crate::ui`), which are siblings over this module.
//!
//! Data enters already authenticated and scoped: a typed [`AccountId`](crate::ids::AccountId)
//! the caller may reach, typed resource ids, and the request bodies as plain structs. It leaves
//! as model values ([`Webhook`](crate::model::Webhook), [`DeliveryRecord`](crate::model::DeliveryRecord), …)
//! or an [`ApiError`] carrying the contract's status and code; turning those into JSON (or
//! HTML) is the caller's job. Writes go through the store under the registry's write lock and
//! are made durable (`ingest.sync`) before a function returns.

pub mod accounts;
pub mod caller;
pub mod deliveries;
pub mod events;
pub mod stats;
pub mod webhooks;

use crate::api::ApiError;

/// A display name: 1 to 200 characters after trimming (accounts and webhooks).
pub fn check_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::bad_request(
            "invalid_name",
            "name must be 1 to 200 characters",
        ));
    }
    Ok(name.to_string())
}
