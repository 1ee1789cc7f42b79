//! The domain's one error type: every failure a request can meet — a broken rule, a missing
//! resource, a full queue, a store that cannot write, a body that could not be read — becomes a
//! [`Refusal`]: the contract's HTTP status, a snake_case code and a message for people.
//!
//! Failures of the layers below (store, ingest, delivery, dispatch, the edge's body reader)
//! enter through the `From` impls here, so `?` carries them up; a refusal leaves to the front
//! end that called, which renders it: the API as the contract's JSON body
//! `{"error": {"code", "message"}}`, the dashboard as a page.

use http::StatusCode;

use crate::delivery::DeliveryError;
use crate::dispatch::TestSendError;
use crate::edge::BodyError;
use crate::ingest::IngestError;
use crate::store::{StoreError, StoreErrorKind};

#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (503 under backpressure).
    pub retry_after: Option<u32>,
}

impl Refusal {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token (Authorization: Bearer TOKEN)",
        )
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn busy(message: impl Into<String>) -> Self {
        Refusal {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
        }
    }
    /// 503 `not_here`: no node can take the request right now (the account's partition is
    /// moving between nodes); retry in a second.
    pub fn not_here(message: impl Into<String>) -> Self {
        Refusal {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_here", message)
        }
    }
    /// 503 `deliveries_lagging`: held for `delivery.max_lag_hold` while deliveries lagged.
    pub fn lagging(message: impl Into<String>) -> Self {
        Refusal {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "deliveries_lagging",
                message,
            )
        }
    }
    /// 429: the caller should come back after `retry_after` seconds.
    pub fn too_many(code: &'static str, message: impl Into<String>, retry_after: u32) -> Self {
        Refusal {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        }
    }
    /// 503 `storage_unavailable`: the store cannot write (disk full, I/O error).
    pub fn storage_unavailable(message: impl Into<String>) -> Self {
        Refusal {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                message,
            )
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        if e.kind() == StoreErrorKind::Moved {
            // The account's partition is moving between nodes: its next owner answers.
            return Refusal::not_here(e.to_string());
        }
        tracing::error!(error = %e, "storage error while serving a request");
        // The disk refuses writes (the engine is about to restart) or cannot be read: the
        // caller may retry. One answer on every path, whichever command met the failure.
        if e.is_retryable() {
            Refusal::storage_unavailable(
                "storage cannot write right now; nothing was changed, retry later",
            )
        } else {
            Refusal::internal("a storage error occurred; see the engine's log")
        }
    }
}

impl From<IngestError> for Refusal {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Busy => Refusal::busy("the engine is at capacity; retry shortly"),
            IngestError::Closed => Refusal {
                retry_after: Some(5),
                ..Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the engine is shutting down",
                )
            },
            IngestError::Commit(e) if e.kind() == StoreErrorKind::Moved => e.into(),
            IngestError::Commit(e) => {
                tracing::error!(error = %e, "commit failed");
                // Whatever the kind, nothing was acknowledged: retryable once the store is back.
                Refusal::storage_unavailable(
                    "the write-ahead log could not be written; nothing was acknowledged, retry later",
                )
            }
        }
    }
}

impl From<DeliveryError> for Refusal {
    fn from(e: DeliveryError) -> Self {
        match e {
            DeliveryError::Closed => Refusal {
                retry_after: Some(5),
                ..Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the engine is shutting down",
                )
            },
            DeliveryError::Store(e) => e.into(),
        }
    }
}

impl From<TestSendError> for Refusal {
    fn from(e: TestSendError) -> Self {
        match e {
            TestSendError::TooMany(_) => Refusal {
                // A test send lasts at most `delivery.timeout`; a second is a fair first wait.
                retry_after: Some(1),
                ..Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_test_sends",
                    e.to_string(),
                )
            },
            TestSendError::Gone => Refusal::not_found("webhook_not_found", e.to_string()),
            TestSendError::Delivery(d) => d.into(),
        }
    }
}

impl From<tokio::task::JoinError> for Refusal {
    fn from(e: tokio::task::JoinError) -> Self {
        tracing::error!(error = %e, "a background step failed");
        Refusal::internal("an internal step failed")
    }
}

impl From<BodyError> for Refusal {
    fn from(e: BodyError) -> Self {
        let (status, code) = match e {
            BodyError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            BodyError::TimedOut { .. } => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            BodyError::Unreadable(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
        };
        Refusal::new(status, code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreErrorKind;

    /// A disk that refuses writes gets one answer whichever path meets it: a read, a commit,
    /// or a change the delivery writer makes (a manual retry, a test send, a recover).
    #[test]
    fn a_full_disk_is_503_storage_unavailable_on_every_path() {
        let full = StoreError::new(StoreErrorKind::Unavailable, "No space left on device");
        let answers = [
            Refusal::from(full.clone()),
            Refusal::from(IngestError::Commit(full.clone())),
            Refusal::from(DeliveryError::Store(full.clone())),
            Refusal::from(TestSendError::Delivery(DeliveryError::Store(full))),
        ];
        for a in answers {
            assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
            assert_eq!(a.code, "storage_unavailable");
        }
        let corrupt = StoreError::new(StoreErrorKind::Internal, "a record does not decode");
        // A write for an account whose partition this node let go: the next owner answers.
        let moved = StoreError::new(StoreErrorKind::Moved, "this node does not hold it");
        for a in [
            Refusal::from(moved.clone()),
            Refusal::from(IngestError::Commit(moved.clone())),
            Refusal::from(DeliveryError::Store(moved)),
        ] {
            assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
            assert_eq!((a.code, a.retry_after), ("not_here", Some(1)), "{a:?}");
        }
        let a = Refusal::from(DeliveryError::Store(corrupt));
        assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
