//! Account routes: create, read, update (name, plan), delete (cascading), API-key rotation.

use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{check_name, empty_response, json_response, ApiError, ApiResult, AppState, Call};
use crate::ids::AccountId;
use crate::model::{now_ms, rfc3339, Account};
use crate::signing;

pub fn view(a: &Account) -> Value {
    json!({
        "id": a.id.as_str(),
        "name": a.name,
        "plan": a.plan,
        "created_at": rfc3339(a.created_ms),
    })
}

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

fn check_plan(state: &AppState, plan: &str) -> Result<String, ApiError> {
    if state.config.plans.contains_key(plan) {
        Ok(plan.to_string())
    } else {
        let known: Vec<&str> = state.config.plans.keys().map(String::as_str).collect();
        Err(ApiError::bad_request(
            "invalid_plan",
            format!(
                "unknown plan {plan:?}; configured plans: {}",
                known.join(", ")
            ),
        ))
    }
}

pub async fn create(state: &AppState, call: Call) -> ApiResult {
    call.caller.require_admin()?;
    let body: CreateAccount = call.json(state).await?;
    let name = check_name(&body.name)?;
    let plan = check_plan(state, &body.plan)?;
    let id = match body.id {
        Some(text) => AccountId::parse(&text).ok_or_else(|| {
            ApiError::bad_request(
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
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "account_exists",
                format!("account {:?} already exists", id.as_str()),
            ));
        }
        state.store.put_account(&account)?;
        state.registry.upsert_account(account.clone());
    }
    state.ingest.sync().await?;
    let mut out = view(&account);
    out["api_key"] = json!(api_key);
    Ok(json_response(StatusCode::CREATED, &out))
}

pub fn get(state: &AppState, call: Call, raw: &str) -> ApiResult {
    let id = call.caller.scope(state, raw)?;
    let account = state
        .registry
        .account(&id)
        .ok_or_else(|| ApiError::not_found("account_not_found", format!("no account {raw:?}")))?;
    Ok(json_response(StatusCode::OK, &view(&account)))
}

pub async fn update(state: &AppState, call: Call, raw: &str) -> ApiResult {
    call.caller.require_admin()?;
    let id = call.caller.scope(state, raw)?;
    let body: UpdateAccount = call.json(state).await?;
    let name = body.name.as_deref().map(check_name).transpose()?;
    let plan = body
        .plan
        .as_deref()
        .map(|p| check_plan(state, p))
        .transpose()?;
    let account = {
        let _writes = state.registry.write_lock();
        let mut account = state.store.get_account(&id)?.ok_or_else(|| {
            ApiError::not_found("account_not_found", format!("no account {raw:?}"))
        })?;
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
    Ok(json_response(StatusCode::OK, &view(&account)))
}

pub async fn delete(state: &AppState, call: Call, raw: &str) -> ApiResult {
    call.caller.require_admin()?;
    let id = call.caller.scope(state, raw)?;
    let account = state
        .store
        .get_account(&id)?
        .ok_or_else(|| ApiError::not_found("account_not_found", format!("no account {raw:?}")))?;
    // Stop new work for the account first, then remove its history off the async workers.
    state.registry.remove_account(&id);
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || store.delete_account(&account)).await??;
    state.ingest.sync().await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub async fn rotate_key(state: &AppState, call: Call, raw: &str) -> ApiResult {
    call.caller.require_admin()?;
    let id = call.caller.scope(state, raw)?;
    let api_key = signing::new_api_key();
    {
        let _writes = state.registry.write_lock();
        let mut account = state.store.get_account(&id)?.ok_or_else(|| {
            ApiError::not_found("account_not_found", format!("no account {raw:?}"))
        })?;
        account.api_key_hash = signing::hash_api_key(&api_key);
        state.store.put_account(&account)?;
        state.registry.upsert_account(account);
    }
    state.ingest.sync().await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "api_key": api_key }),
    ))
}
