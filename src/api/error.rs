//! The API's one error type: every failure a handler can meet becomes an HTTP status and the
//! contract's body `{"error": {"code": "snake_case_code", "message": "…"}}`.

use http::StatusCode;

use crate::delivery::DeliveryError;
use crate::dispatch::TestSendError;
use crate::ingest::IngestError;
use crate::store::StoreError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (503 under backpressure).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
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
        ApiError {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
        }
    }
    /// 503 `deliveries_lagging`: held for `delivery.max_lag_hold` while deliveries lagged.
    pub fn lagging(message: impl Into<String>) -> Self {
        ApiError {
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
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        }
    }
    /// 503 `storage_unavailable`: the store cannot write (disk full, I/O error).
    pub fn storage_unavailable(message: impl Into<String>) -> Self {
        ApiError {
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

    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        }))
        .expect("serialising a JSON value cannot fail")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage error while serving a request");
        // The disk refuses writes (the engine is about to restart) or cannot be read: the
        // caller may retry. One answer on every path, whichever command met the failure.
        if e.is_retryable() {
            ApiError::storage_unavailable(
                "storage cannot write right now; nothing was changed, retry later",
            )
        } else {
            ApiError::internal("a storage error occurred; see the engine's log")
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Busy => ApiError::busy("the engine is at capacity; retry shortly"),
            IngestError::Closed => ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the engine is shutting down",
                )
            },
            IngestError::Commit(e) => {
                tracing::error!(error = %e, "commit failed");
                // Whatever the kind, nothing was acknowledged: retryable once the store is back.
                ApiError::storage_unavailable(
                    "the write-ahead log could not be written; nothing was acknowledged, retry later",
                )
            }
        }
    }
}

impl From<DeliveryError> for ApiError {
    fn from(e: DeliveryError) -> Self {
        match e {
            DeliveryError::Closed => ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the engine is shutting down",
                )
            },
            DeliveryError::Store(e) => e.into(),
        }
    }
}

impl From<TestSendError> for ApiError {
    fn from(e: TestSendError) -> Self {
        match e {
            TestSendError::TooMany(_) => ApiError {
                // A test send lasts at most `delivery.timeout`; a second is a fair first wait.
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_test_sends",
                    e.to_string(),
                )
            },
            TestSendError::Gone => ApiError::not_found("webhook_not_found", e.to_string()),
            TestSendError::Delivery(d) => d.into(),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        tracing::error!(error = %e, "a background step failed");
        ApiError::internal("an internal step failed")
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
            ApiError::from(full.clone()),
            ApiError::from(IngestError::Commit(full.clone())),
            ApiError::from(DeliveryError::Store(full.clone())),
            ApiError::from(TestSendError::Delivery(DeliveryError::Store(full))),
        ];
        for a in answers {
            assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
            assert_eq!(a.code, "storage_unavailable");
        }
        let corrupt = StoreError::new(StoreErrorKind::Internal, "a record does not decode");
        let a = ApiError::from(DeliveryError::Store(corrupt));
        assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
