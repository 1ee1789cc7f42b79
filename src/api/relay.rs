//! Relaying to the node that serves an account (divided mode, see `crate::placement`): a
//! request under `/v1/accounts/{id}` and the events of an ingest whose accounts another node
//! serves go there, and its answer comes back as it was given. A request another node relayed
//! is never relayed again: if this node does not serve its account either (ownership moved
//! meanwhile), the client is told to retry.

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use http_body_util::{Either, Full};

use super::{ApiResult, Call};
use crate::domain::{Refusal, Services};
use crate::edge::ClientAddr;
use crate::ids::AccountId;
use crate::placement::{Owner, Route, FORWARDED_BY};

/// Whether a relaying node sent this request.
pub fn was_relayed(call: &Call) -> bool {
    call.req.headers().contains_key(FORWARDED_BY)
}

/// Where a request about `account` goes; `None`: here (one node alone, or this node serves
/// it, or the request was relayed to it already).
pub fn elsewhere(
    s: &Services,
    account: &AccountId,
    relayed: bool,
) -> Option<Result<Owner, Refusal>> {
    let placement = s.placement.as_ref()?;
    match placement.route(account) {
        Route::Here => None,
        Route::There(_) | Route::Nobody(_) if relayed => Some(Err(Refusal::not_here(
            "this node does not serve that account (ownership is moving between nodes)",
        ))),
        Route::There(owner) => Some(Ok(owner)),
        Route::Nobody(why) => Some(Err(Refusal::not_here(why))),
    }
}

/// Relays a request under `/v1/accounts/{account}` whose account another node serves;
/// gives the call back when it is this node's to serve.
pub async fn account_route(s: &Services, account: &str, call: Call) -> Result<ApiResult, Call> {
    let Some(id) = AccountId::parse(account) else {
        return Err(call);
    };
    let owner = match elsewhere(s, &id, was_relayed(&call)) {
        None => return Err(call),
        Some(Err(refusal)) => return Ok(Err(refusal)),
        Some(Ok(owner)) => owner,
    };
    let peer = call.req.extensions().get::<ClientAddr>().map(|a| a.0);
    let (parts, body) = call.req.into_parts();
    Ok(send(s, &owner, parts, Either::Left(body), peer).await)
}

/// Relays a request (`head`) whose body was read already (`bytes`, possibly rewritten: a
/// batch's share).
pub async fn send_bytes(
    s: &Services,
    owner: &Owner,
    head: &http::Request<()>,
    bytes: Bytes,
    peer: Option<std::net::SocketAddr>,
) -> ApiResult {
    let mut parts = head_of(head);
    parts.headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(bytes.len() as u64),
    );
    send(s, owner, parts, Either::Right(Full::new(bytes)), peer).await
}

async fn send(
    s: &Services,
    owner: &Owner,
    parts: http::request::Parts,
    body: crate::placement::RelayBody,
    peer: Option<std::net::SocketAddr>,
) -> ApiResult {
    let placement = s
        .placement
        .as_ref()
        .ok_or_else(|| Refusal::not_here("not relaying"))?;
    match placement.relay(owner, parts, body, peer).await {
        Ok((status, headers, bytes)) => {
            let mut r = Response::new(Full::new(bytes));
            *r.status_mut() = status;
            *r.headers_mut() = headers;
            Ok(r)
        }
        Err(why) => Err(Refusal::not_here(why)),
    }
}

/// A request's head without its extensions (which do not clone).
fn head_of<B>(req: &http::Request<B>) -> http::request::Parts {
    let mut head = http::Request::new(());
    *head.method_mut() = req.method().clone();
    *head.uri_mut() = req.uri().clone();
    *head.version_mut() = req.version();
    *head.headers_mut() = req.headers().clone();
    head.into_parts().0
}

/// What an ingest keeps of its request to relay events after reading the body.
pub struct Head {
    /// The request without its body.
    pub request: http::Request<()>,
    pub peer: Option<std::net::SocketAddr>,
    pub relayed: bool,
}

/// The request's head when nodes divide the work (`None`: one node serves everything).
pub fn head(s: &Services, call: &Call) -> Option<Head> {
    s.placement.as_ref()?;
    Some(Head {
        request: http::Request::from_parts(head_of(&call.req), ()),
        peer: call.req.extensions().get::<ClientAddr>().map(|a| a.0),
        relayed: was_relayed(call),
    })
}
