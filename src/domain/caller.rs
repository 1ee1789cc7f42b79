//! Who is calling: the one place a secret (a `/v1` bearer token or the key typed into the
//! dashboard's login form) becomes a [`Caller`], and the scope/owner check both front ends
//! apply before calling a domain function. The secret enters as a `&str`; it leaves as a
//! `Caller`, or a [`Refusal`] (404 for another account's resources, 403 for admin routes).

use super::{Refusal, Services};
use crate::ids::AccountId;
use crate::signing;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Account(AccountId),
}

impl Caller {
    /// The account a route under `/v1/accounts/{id}` addresses, if this caller may reach it.
    /// Another account's resources answer 404, as if they did not exist.
    pub(crate) fn scope(&self, state: &Services, raw: &str) -> Result<AccountId, Refusal> {
        let missing = || Refusal::not_found("account_not_found", format!("no account {raw:?}"));
        let id = AccountId::parse(raw).ok_or_else(missing)?;
        match self {
            Caller::Account(own) if *own != id => Err(missing()),
            _ if !state.registry.account_exists(&id) => Err(missing()),
            _ => Ok(id),
        }
    }

    pub(crate) fn require_admin(&self) -> Result<(), Refusal> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Account(_) => Err(Refusal::forbidden("this route needs the admin token")),
        }
    }
}

impl Caller {
    /// The caller `token` names: the admin token, or an account's API key; `None` for anything
    /// else. `/v1` (with its failed-auth guard) and the dashboard login both call this.
    pub fn resolve(state: &Services, token: &str) -> Option<Caller> {
        if is_admin_token(state, token) {
            Some(Caller::Admin)
        } else {
            state
                .registry
                .account_by_key(&signing::hash_api_key(token))
                .map(Caller::Account)
        }
    }
}

/// Whether `token` is the admin token (constant time; never true before one is resolved).
fn is_admin_token(state: &Services, token: &str) -> bool {
    state
        .config
        .auth
        .admin_token
        .as_deref()
        .is_some_and(|admin| signing::constant_time_eq(token, admin))
}
