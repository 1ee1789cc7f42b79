//! Account routes (HTTP side): admin scope, body parsing and the JSON views of create, read,
//! update (name, plan), delete (cascading) and API-key rotation. The rules are in
//! [`domain::accounts`](crate::domain::accounts).

use http::StatusCode;
use serde_json::{json, Value};

use super::{empty_response, json_response, ApiResult, Call};
use crate::domain::accounts as domain;
pub use crate::domain::accounts::{CreateAccount, UpdateAccount};
use crate::domain::Services;
use crate::model::{rfc3339, Account};

pub fn view(a: &Account) -> Value {
    json!({
        "id": a.id.as_str(),
        "name": a.name,
        "plan": a.plan,
        "created_at": rfc3339(a.created_ms),
    })
}

pub async fn create(state: &Services, call: Call) -> ApiResult {
    call.caller.require_admin()?;
    let body: CreateAccount = call.json(state).await?;
    let (account, api_key) = domain::create_account(state, body).await?;
    let mut out = view(&account);
    out["api_key"] = json!(api_key);
    Ok(json_response(StatusCode::CREATED, &out))
}

pub fn get(state: &Services, call: Call, raw: &str) -> ApiResult {
    let id = call.caller.scope(state, raw)?;
    let account = domain::get_account(state, &id)?;
    Ok(json_response(StatusCode::OK, &view(&account)))
}

pub async fn update(state: &Services, call: Call, raw: &str) -> ApiResult {
    call.caller.require_admin()?;
    let id = call.caller.scope(state, raw)?;
    let body: UpdateAccount = call.json(state).await?;
    let account = domain::update_account(state, &id, body).await?;
    Ok(json_response(StatusCode::OK, &view(&account)))
}

pub async fn delete(state: &Services, call: Call, raw: &str) -> ApiResult {
    call.caller.require_admin()?;
    let id = call.caller.scope(state, raw)?;
    domain::delete_account(state, &id).await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub async fn rotate_key(state: &Services, call: Call, raw: &str) -> ApiResult {
    call.caller.require_admin()?;
    let id = call.caller.scope(state, raw)?;
    let api_key = domain::rotate_api_key(state, &id).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "api_key": api_key }),
    ))
}
