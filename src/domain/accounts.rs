//! Account rules: creation (id, name, plan), reads, updates, cascading deletion, API-key
//! rotation, and what a plan allows. Bodies enter as [`CreateAccount`] / [`UpdateAccount`];
//! accounts leave as [`Account`] (the fresh API key alongside it, once).

use http::StatusCode;
use serde::Deserialize;

use super::{check_name, Refusal, Services};
use crate::ids::AccountId;
use crate::model::{now_ms, Account};
use crate::signing;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    pub name: String,
    pub plan: String,
    #[serde(default)]
    pub id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateAccount {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub plan: Option<String>,
}

/// What an account's plan allows, and how much of it is used.
#[derive(Debug, Clone)]
pub struct PlanUsage {
    pub plan: String,
    /// `None`: unlimited.
    pub max_webhooks: Option<u32>,
    pub webhooks: usize,
    /// Deliveries per second, all webhooks together; 0 is unlimited.
    pub events_per_second: u32,
}

impl PlanUsage {
    pub fn at_limit(&self) -> bool {
        self.max_webhooks
            .is_some_and(|max| self.webhooks >= max as usize)
    }
}

fn not_found(id: &AccountId) -> Refusal {
    Refusal::not_found("account_not_found", format!("no account {:?}", id.as_str()))
}

pub fn check_plan(state: &Services, plan: &str) -> Result<String, Refusal> {
    if state.config.plans.contains_key(plan) {
        Ok(plan.to_string())
    } else {
        let known: Vec<&str> = state.config.plans.keys().map(String::as_str).collect();
        Err(Refusal::bad_request(
            "invalid_plan",
            format!(
                "unknown plan {plan:?}; configured plans: {}",
                known.join(", ")
            ),
        ))
    }
}

/// Creates an account; returns it with its API key (shown this once, stored only hashed).
pub async fn create_account(
    state: &Services,
    body: CreateAccount,
) -> Result<(Account, String), Refusal> {
    let name = check_name(&body.name)?;
    let plan = check_plan(state, &body.plan)?;
    let id = match body.id {
        Some(text) => AccountId::parse(&text).ok_or_else(|| {
            Refusal::bad_request(
                "invalid_id",
                format!(
                    "id must be 1 to {} characters of [A-Za-z0-9_.-]",
                    AccountId::MAX_LEN
                ),
            )
        })?,
        None => AccountId::generate(),
    };
    let api_key = signing::new_api_key();
    let account = Account {
        id: id.clone(),
        name,
        plan,
        created_ms: now_ms(),
        api_key_hash: signing::hash_api_key(&api_key),
    };
    {
        let _writes = state.registry.write_lock();
        if state.registry.account_exists(&id) || state.store.get_account(&id)?.is_some() {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "account_exists",
                format!("account {:?} already exists", id.as_str()),
            ));
        }
        state.store.put_account(&account)?;
        state.registry.upsert_account(account.clone());
    }
    state.ingest.sync().await?;
    Ok((account, api_key))
}

pub fn get_account(state: &Services, id: &AccountId) -> Result<Account, Refusal> {
    state.registry.account(id).ok_or_else(|| not_found(id))
}

/// Every account, oldest first (the operator's list).
pub fn list_accounts(state: &Services) -> Result<Vec<Account>, Refusal> {
    let mut accounts = state.store.all_accounts()?;
    accounts.sort_by(|a, b| (a.created_ms, &a.id.as_str()).cmp(&(b.created_ms, &b.id.as_str())));
    Ok(accounts)
}

pub async fn update_account(
    state: &Services,
    id: &AccountId,
    body: UpdateAccount,
) -> Result<Account, Refusal> {
    let name = body.name.as_deref().map(check_name).transpose()?;
    let plan = body
        .plan
        .as_deref()
        .map(|p| check_plan(state, p))
        .transpose()?;
    let account = {
        let _writes = state.registry.write_lock();
        let mut account = state.store.get_account(id)?.ok_or_else(|| not_found(id))?;
        if let Some(name) = name {
            account.name = name;
        }
        if let Some(plan) = plan {
            account.plan = plan;
        }
        state.store.put_account(&account)?;
        state.registry.upsert_account(account.clone());
        account
    };
    state.ingest.sync().await?;
    Ok(account)
}

/// Deletes the account with its webhooks and its whole delivery history.
pub async fn delete_account(state: &Services, id: &AccountId) -> Result<(), Refusal> {
    let account = state.store.get_account(id)?.ok_or_else(|| not_found(id))?;
    // Stop new work for the account first, then remove its history off the async workers.
    {
        let _writes = state.registry.write_lock();
        state.registry.remove_account(id);
    }
    state.deliverer.deliveries.forget_account(account).await?;
    {
        // A registry follower that read the store before the delete reached it may have put
        // the account back meanwhile; from now on no read of the store has it.
        let _writes = state.registry.write_lock();
        state.registry.remove_account(id);
    }
    state.ingest.sync().await?;
    Ok(())
}

/// Replaces the account's API key; returns the new key (the old one stops working at once).
pub async fn rotate_api_key(state: &Services, id: &AccountId) -> Result<String, Refusal> {
    let api_key = signing::new_api_key();
    {
        let _writes = state.registry.write_lock();
        let mut account = state.store.get_account(id)?.ok_or_else(|| not_found(id))?;
        account.api_key_hash = signing::hash_api_key(&api_key);
        state.store.put_account(&account)?;
        state.registry.upsert_account(account);
    }
    state.ingest.sync().await?;
    Ok(api_key)
}

/// The account's plan, its limits and its use of them.
pub fn plan_usage(state: &Services, id: &AccountId) -> PlanUsage {
    let plan = state.registry.plan_of(id).unwrap_or_default();
    let limits = state.config.plans.get(&plan);
    PlanUsage {
        max_webhooks: limits.and_then(|p| p.max_webhooks),
        events_per_second: limits.map_or(0, |p| p.events_per_second),
        webhooks: state.registry.hook_count(id),
        plan,
    }
}
