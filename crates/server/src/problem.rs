//! Errors as RFC 9457 `application/problem+json`, each with a stable machine-readable `code` and,
//! for validation errors, the offending `field`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An error answer. Its text never contains a secret or a request body.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type, stable per code (`urn:rtpay:problem:<code>`).
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable machine-readable code: a ledger result code (e.g. `insufficient_funds`) or a
    /// validation rule (e.g. `invalid_uuid`).
    pub code: String,
    /// The offending field, as a JSON path (`transfers[3].amount`), for validation errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Seconds to wait before retrying, for 429 and 503.
    #[serde(skip)]
    pub retry_after_seconds: Option<u32>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Problem {
        Problem {
            type_: format!("urn:rtpay:problem:{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            // Details and fields may quote input: a card number in them is masked.
            detail: vault::mask::redact_pans(&detail.into()),
            code: code.to_owned(),
            field: None,
            retry_after_seconds: None,
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> Problem {
        self.field = Some(vault::mask::redact_pans(&field.into()));
        self
    }

    /// 422: a field breaks a rule.
    pub fn invalid(field: impl Into<String>, code: &str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail).field(field)
    }

    pub fn not_found(what: &str) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not_found", format!("no {what} with this id"))
    }

    pub fn unauthorized(detail: &str) -> Problem {
        Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    pub fn unavailable(detail: impl Into<String>, retry_after_seconds: u32) -> Problem {
        let mut p = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail);
        p.retry_after_seconds = Some(retry_after_seconds);
        p
    }

    /// 429, with `Retry-After`.
    pub fn too_many(code: &str, detail: impl Into<String>, wait: std::time::Duration) -> Problem {
        let mut p = Problem::new(StatusCode::TOO_MANY_REQUESTS, code, detail);
        p.retry_after_seconds = Some(crate::limits::retry_after_seconds(wait));
        p
    }

    pub fn internal() -> Problem {
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "an unexpected error happened; it was logged")
    }
}

impl From<store::StoreError> for Problem {
    fn from(e: store::StoreError) -> Problem {
        match e {
            store::StoreError::Busy => Problem::unavailable("the write queue is full; retry shortly", 1),
            store::StoreError::Unavailable(why) => {
                tracing::warn!(error = %why, "storage unavailable");
                Problem::unavailable(
                    "storage is unavailable; retry later with the same id or Idempotency-Key (a write applies once)",
                    2,
                )
            }
            store::StoreError::Conflict(why) => Problem::new(StatusCode::CONFLICT, "conflict", why),
            store::StoreError::Corrupt(why) => {
                tracing::error!(error = %why, "storage holds an unreadable value");
                Problem::internal()
            }
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).expect("problems serialize");
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(seconds) = self.retry_after_seconds {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
