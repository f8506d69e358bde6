//! Request bodies: size-limited, JSON only, unknown fields refused, and every error naming the
//! field (as a JSON path) and the rule it broke. Also a path extractor whose rejection is a problem
//! too.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::json_objects::Objects;
use crate::problem::Problem;

/// The largest request body: a full batch of 8,190 transfers with metadata fits comfortably.
pub const BODY_LEN_MAX: usize = 4 * 1024 * 1024;

/// A JSON request body of type `T`.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = Problem;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Problem> {
        json_content_type(&request)?;
        let (parts, body) = request.into_parts();
        let bytes = limited_body(&parts.headers, body, BODY_LEN_MAX).await?;
        parse(&bytes).map(Json)
    }
}

/// A JSON request body that may be left out (an empty body).
pub struct OptionalJson<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJson<T> {
    type Rejection = Problem;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Problem> {
        json_content_type(&request)?;
        let (parts, body) = request.into_parts();
        let bytes = limited_body(&parts.headers, body, BODY_LEN_MAX).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        parse(&bytes).map(|v| OptionalJson(Some(v)))
    }
}

/// A body's `Content-Type`, when given, must be JSON, and given once.
fn json_content_type(request: &Request) -> Result<(), Problem> {
    let mut values = request.headers().get_all(header::CONTENT_TYPE).iter();
    if let Some(content_type) = values.next() {
        if values.next().is_some() {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "duplicate_header",
                "more than one Content-Type header; send exactly one",
            )
            .field("Content-Type"));
        }
        let ok = content_type
            .to_str()
            .map(|v| {
                let essence = v.split(';').next().unwrap_or("").trim().as_bytes();
                let ends_with = |suffix: &[u8]| {
                    essence.len() >= suffix.len()
                        && essence[essence.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                };
                essence.eq_ignore_ascii_case(b"application/json") || ends_with(b"+json")
            })
            .unwrap_or(false);
        if !ok {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON (Content-Type: application/json)",
            ));
        }
    }
    Ok(())
}

/// How long a body may take to arrive, once its head has: then 408, and the connection closes.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn too_large(limit: usize) -> Problem {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("the body exceeds {limit} bytes"))
}

/// Why a body's reading stopped: over the limit (413), or its framing broke (a chunked encoding
/// that is not one, the connection closing mid-body: 400).
fn unread(error: axum::Error, limit: usize) -> Problem {
    if error.into_inner().is::<http_body_util::LengthLimitError>() {
        return too_large(limit);
    }
    Problem::new(
        StatusCode::BAD_REQUEST,
        "malformed_body",
        "the body could not be read: its chunked encoding is broken, or it ended before its length",
    )
}

/// A request's body, whatever its media type, read the way every route reads one: at most
/// `limit` bytes, and within [`BODY_READ_TIMEOUT`] (then 408). A body declared larger than the
/// limit is refused before any of it is read: waiting for bytes that will be refused anyway held
/// the connection while the client sent (or never sent) them.
pub(crate) async fn limited_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Problem> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large(limit));
    }
    match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Ok(read) => read.map_err(|e| unread(e, limit)),
        Err(_) => {
            // hyper closes a connection whose request body was left unread.
            Err(Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the body did not arrive within {} seconds", BODY_READ_TIMEOUT.as_secs()),
            ))
        }
    }
}

/// Parses a JSON body, mapping each error to a problem with the field's path.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    if bytes.is_empty() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "the body is empty; a JSON object is expected",
        ));
    }
    // The common case without tracking the path (which costs at every field); a body that fails
    // is parsed again with it, and fails the same way, for the field to name. Structs are read
    // from objects only (`json_objects`): serde's own would take a list of their fields in order.
    let mut de = serde_json::Deserializer::from_slice(bytes);
    if let Ok(value) = T::deserialize(Objects(&mut de)) {
        if de.end().is_ok() {
            return Ok(value);
        }
    }
    // Not JSON at all is 400, whatever the fields read before the syntax broke would say.
    if let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {}", strip_position(&error.to_string())),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let result: Result<T, _> = serde_path_to_error::deserialize(Objects(&mut de));
    match result {
        Ok(value) => {
            // Trailing data after the value is malformed too (whitespace is fine).
            if de.end().is_err() {
                return Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    "malformed_json",
                    "trailing data after the JSON value",
                ));
            }
            Ok(value)
        }
        Err(error) => {
            let path = error.path().to_string();
            let inner = error.into_inner();
            let message = inner.to_string();
            match inner.classify() {
                serde_json::error::Category::Data => {
                    let field = if path == "." { None } else { Some(path) };
                    // Without serde's " at line L column C", exactly: a key the client wrote with
                    // " at line " inside it stays whole, and is judged whole.
                    let position = format!(" at line {} column {}", inner.line(), inner.column());
                    let message = message.strip_suffix(&position).unwrap_or(&message).to_owned();
                    let child = |parent: Option<String>, name: String| match parent {
                        Some(parent) => format!("{parent}.{name}"),
                        None => name,
                    };
                    // A key serde refused after reading it: the path may already end with it.
                    let read_key = |path: Option<String>, name: String| match path {
                        Some(path) if path == name || path.ends_with(&format!(".{name}")) => path,
                        parent => child(parent, name),
                    };
                    let (code, field, message) = if let Some(name) = unknown_field_name(&message) {
                        if !shown_as_field(&name) {
                            // A key that is no field name (a secret, a card number, a long text)
                            // is not echoed back.
                            let at = field.and_then(|path| match path.strip_suffix(&format!(".{name}")) {
                                Some(parent) => Some(parent.to_owned()),
                                None if path == name => None,
                                None => Some(path),
                            });
                            let detail =
                                "an unknown field; its name is not shown (longer than 64 characters, or not a name)";
                            ("unknown_field", at, detail.to_owned())
                        } else {
                            ("unknown_field", Some(read_key(field, name)), message)
                        }
                    } else if let Some(name) = quoted(&message, "missing field `") {
                        ("missing_field", Some(child(field, name)), message)
                    } else if let Some(name) = quoted(&message, "duplicate field `") {
                        ("duplicate_field", Some(read_key(field, name)), format!("{message}: each key may appear once"))
                    } else if let Some(name) =
                        message.strip_prefix("repeated key `").and_then(|rest| rest.strip_suffix('`'))
                    {
                        // A key inside `metadata`: the client's own text, named only if it is a name,
                        // and so is every key on the path to it.
                        let field =
                            field.map(|path| shown_path(path.strip_suffix(&format!(".{name}")).unwrap_or(&path)));
                        if shown_as_field(name) {
                            let detail =
                                format!("the key `{name}` appears twice in one object: each key may appear once");
                            ("duplicate_field", field, detail)
                        } else {
                            let detail =
                                "a key appears twice in one object (its name is not shown): each key may appear once";
                            ("duplicate_field", field, detail.to_owned())
                        }
                    } else if field.is_none() && message.starts_with("invalid type") {
                        // What the body is, never what it holds (a secret sent as a JSON string).
                        let message = without_values(&message);
                        let got = message.split(',').next().unwrap_or("").trim_start_matches("invalid type: ");
                        ("invalid_body", None, format!("the body must be a JSON object, not {got}"))
                    } else if field.as_deref().is_some_and(|f| f == "amount" || f.ends_with(".amount")) {
                        // One code for every broken amount, as `check_amount` gives a zero.
                        let detail = format!(
                            "must be an integer number of minor units in 1..=2^63-1 ({})",
                            without_values(&message)
                        );
                        ("invalid_amount", field, detail)
                    } else {
                        ("invalid_field", field, without_values(&message))
                    };
                    let p = Problem::new(StatusCode::UNPROCESSABLE_ENTITY, code, message);
                    Err(match field {
                        Some(f) => p.field(f),
                        None => p,
                    })
                }
                _ => Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    "malformed_json",
                    format!("the body is not valid JSON: {}", strip_position(&message)),
                )),
            }
        }
    }
}

/// serde's message without the client's values it quotes (`invalid type: integer `52998224725`,
/// expected a string`: a CPF sent as a number; `unknown variant `...``): what it found, up to the
/// value, and what was expected, in the type's own words. The expectation is the message's last
/// `, expected` (a value may hold those words); what was found is cut at its first quote.
pub(crate) fn without_values(message: &str) -> String {
    let (found, expected) = match message.rfind(", expected") {
        Some(at) => message.split_at(at),
        None => (message, ""),
    };
    let found = found.find(['`', '"']).map_or(found, |at| &found[..at]).trim_end();
    format!("{found}{expected}")
}

/// The longest unknown key a problem names.
const SHOWN_NAME_LEN_MAX: usize = 64;

/// Whether an unknown key may be named in a problem: a plausible field name, not a secret pasted
/// in the wrong place (the API's secrets are longer than this) nor a card number.
pub(crate) fn shown_as_field(name: &str) -> bool {
    name.len() <= SHOWN_NAME_LEN_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && !vault::mask::holds_pan(name)
        && !name.starts_with(crate::auth::TENANT_SECRET_PREFIX)
        && !name.starts_with(crate::auth::OPERATOR_SECRET_PREFIX)
}

/// `path` up to its first key that is not [`shown_as_field`] (`metadata.a.<secret>.b` names
/// `metadata.a`).
fn shown_path(path: &str) -> String {
    let mut shown = String::new();
    for segment in path.split('.') {
        let (key, indexes) = segment.split_at(segment.find('[').unwrap_or(segment.len()));
        // Indexes as serde_path_to_error writes them, `[0][12]`, and nothing else.
        let only_indexes = indexes
            .split_terminator(']')
            .all(|i| i.strip_prefix('[').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())));
        if !shown_as_field(key) || !only_indexes {
            break;
        }
        if !shown.is_empty() {
            shown.push('.');
        }
        shown.push_str(segment);
    }
    shown
}

/// serde_json's message without its position (" at line L column C", always last).
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The name quoted after `prefix` in a serde message (`missing field `x``): a field of the type
/// read, so a name without backticks.
fn quoted(message: &str, prefix: &str) -> Option<String> {
    message.strip_prefix(prefix).and_then(|rest| rest.split('`').next()).map(str::to_owned)
}

/// The unknown key a serde message names (`unknown field `KEY`, expected ...`): the client's own
/// text, which may hold backticks, so the whole of it up to serde's own ending (the last "`,
/// expected", or "`, there are no fields"), never a prefix that would pass [`shown_as_field`]
/// while the message echoed the rest.
pub(crate) fn unknown_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let end = match rest.strip_suffix("`, there are no fields") {
        Some(name) => name.len(),
        None => rest.rfind("`, expected")?,
    };
    Some(rest[..end].to_owned())
}

/// An unknown query parameter, refused.
pub fn unknown_parameter(name: &str, expected: &str) -> Problem {
    parameter_problem(name, "unknown_parameter", &format!("is unknown; expected {expected}"))
}

/// A query parameter refused with `code` because it `is` as said; named only when it is
/// [`shown_as_field`] (a secret pasted into a URL is not echoed back).
fn parameter_problem(name: &str, code: &str, is: &str) -> Problem {
    if shown_as_field(name) {
        Problem::invalid(name, code, format!("query parameter `{name}` {is}"))
    } else {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            code,
            format!("a query parameter {is}; its name is not shown (longer than 64 characters, or not a name)"),
        )
    }
}

/// A request's query parameters, each named once. Like `axum::extract::Query<HashMap<..>>`
/// (values decoded lossily as UTF-8), but a parameter given twice is refused (422
/// `duplicate_parameter`): which of the two to honour would be a guess.
pub struct Params(pub std::collections::HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(parts.uri.query().unwrap_or("")).map_err(|_| {
                Problem::new(StatusCode::BAD_REQUEST, "malformed_query", "the query string cannot be decoded")
            })?;
        let mut params = std::collections::HashMap::with_capacity(pairs.len());
        for (name, value) in pairs {
            if params.contains_key(&name) {
                return Err(parameter_problem(&name, "duplicate_parameter", "is given more than once"));
            }
            params.insert(name, value);
        }
        Ok(Params(params))
    }
}

/// A path parameter, like `axum::extract::Path`, but refused as a problem like every other error.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => {
                let mut p = Problem::new(rejection.status(), "malformed_path", rejection.body_text());
                if let PathRejection::FailedToDeserializePathParams(e) = &rejection {
                    if let ErrorKind::InvalidUtf8InPathParam { key } = e.kind() {
                        p.field = Some(key.clone());
                    }
                }
                Err(p)
            }
        }
    }
}

/// A JSON response with a status.
pub fn reply<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let mut body = Vec::with_capacity(512);
    serde_json::to_writer(&mut body, value).expect("responses serialize");
    reply_json(status, body)
}

/// [`reply`] for an answer that shows a secret (an API key's, a card's number and CVV2, a webhook
/// secret, an OAuth client's): `Cache-Control: no-store`, so that no cache on the way keeps it
/// (RFC 9111 §5.2.2.5; the OAuth token answers say so too, RFC 6749 §5.1).
pub fn secret_reply<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let mut response = reply(status, value);
    response.headers_mut().insert(header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
    response
}

/// A response with a status and a body already written as JSON.
pub fn reply_json(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        amount: u64,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        items: Vec<Inner>,
    }

    #[test]
    fn serdes_messages_lose_the_values_they_quote_and_keep_the_types_words() {
        for (message, expected) in [
            ("invalid type: integer `52998224725`, expected a string", "invalid type: integer, expected a string"),
            ("invalid value: string \"4111 1111\", expected u64", "invalid value: string, expected u64"),
            (
                "unknown variant `52998224725`, expected `person` or `company`",
                "unknown variant, expected `person` or `company`",
            ),
            ("invalid type: floating point `1.5`, expected u64", "invalid type: floating point, expected u64"),
            ("invalid type: sequence, expected struct Body", "invalid type: sequence, expected struct Body"),
            ("invalid length 3, expected fewer elements", "invalid length 3, expected fewer elements"),
            ("invalid type: boolean `true`, expected a string", "invalid type: boolean, expected a string"),
            // A value holding the words, or a quote of the other kind.
            ("invalid type: string \"x, expected SECRET\", expected u64", "invalid type: string, expected u64"),
            ("unknown variant `a\"b`c SECRET`, expected `person`", "unknown variant, expected `person`"),
            ("invalid type: string \"rtpay_sk_0123\"", "invalid type: string"),
        ] {
            assert_eq!(without_values(message), expected);
        }
    }

    #[test]
    fn a_body_is_json_by_its_media_type_in_any_case_with_parameters_or_without_one() {
        let with = |content_type: Option<&str>| {
            let mut request = Request::new(Body::empty());
            if let Some(value) = content_type {
                request.headers_mut().insert(header::CONTENT_TYPE, value.parse().unwrap());
            }
            json_content_type(&request).is_ok()
        };
        for ok in [
            None,
            Some("application/json"),
            Some("Application/JSON; charset=utf-8"),
            Some(" application/json "),
            Some("application/merge-patch+json"),
            Some("application/PROBLEM+JSON"),
        ] {
            assert!(with(ok), "{ok:?}");
        }
        for refused in ["text/plain", "application/jsonx", "json", "application/xml", "application/json-seq", ""] {
            assert!(!with(Some(refused)), "{refused}");
        }
    }

    fn problem(body: &[u8]) -> Problem {
        parse::<Outer>(body).unwrap_err()
    }

    #[test]
    fn each_error_names_the_field_and_rule() {
        let cases: &[(&[u8], u16, &str, Option<&str>)] = &[
            (b"", 400, "malformed_json", None),
            (b"{", 400, "malformed_json", None),
            (b"{\"items\": []} x", 400, "malformed_json", None),
            (b"{\"items\": [{\"amount\": \"\xff\"}]}", 400, "malformed_json", None),
            (b"{\"items\": [{\"amount\": -1}]}", 422, "invalid_amount", Some("items[0].amount")),
            (b"{\"items\": [{\"amount\": 1.5}]}", 422, "invalid_amount", Some("items[0].amount")),
            (b"{\"items\": [{\"amount\": \"1\"}]}", 422, "invalid_amount", Some("items[0].amount")),
            (b"{\"items\": [{\"amount\": 1e3}]}", 422, "invalid_amount", Some("items[0].amount")),
            (b"{\"items\": [{\"amount\": 1}, {\"amount\": 1, \"x\": 2}]}", 422, "unknown_field", Some("items[1].x")),
            (b"{\"items\": [{}]}", 422, "missing_field", Some("items[0].amount")),
            (b"{}", 422, "missing_field", Some("items")),
            (b"[]", 422, "invalid_body", None),
            (b"null", 422, "invalid_body", None),
            // A list of the fields in order is no object, at any depth.
            (b"[[{\"amount\": 1}]]", 422, "invalid_body", None),
            (b"{\"items\": [[1]]}", 422, "invalid_field", Some("items[0]")),
            // Not JSON is 400 even where the fields read before the break are wrong.
            (b"{\"bogus\":1", 400, "malformed_json", None),
            (b"[[[[", 400, "malformed_json", None),
            (b"{} x", 400, "malformed_json", None),
            (b"{\"items\": [], \"items\": []}", 422, "duplicate_field", Some("items")),
            (b"{\"items\": [{\"amount\": 1, \"amount\": 2}]}", 422, "duplicate_field", Some("items[0].amount")),
        ];
        for (body, status, code, field) in cases {
            let p = problem(body);
            assert_eq!(
                (p.status, p.code.as_str(), p.field.as_deref()),
                (*status, *code, *field),
                "{:?}: {}",
                String::from_utf8_lossy(body),
                p.detail
            );
        }
    }

    #[test]
    fn an_unknown_key_that_is_a_secret_or_a_card_number_is_not_echoed() {
        let secret = format!("rtpay_sk_{}_{}", "0".repeat(32), "ab".repeat(32));
        for key in [secret.as_str(), "4111111111111111", "4111-1111-1111-1111", "rtpay_op_x", &"k".repeat(65)] {
            let body = format!(r#"{{"items": [{{"amount": 1, "{key}": 2}}]}}"#);
            let p = problem(body.as_bytes());
            assert_eq!((p.status, p.code.as_str()), (422, "unknown_field"), "{key}");
            let shown = serde_json::to_string(&p).unwrap();
            assert!(!shown.contains(key), "{key} echoed: {shown}");
            assert_eq!(p.field.as_deref(), Some("items[0]"), "the object it was found in: {shown}");
        }
        let p = problem(br#"{"items": [{"amount": 1, "amount_minor": 2}]}"#);
        assert_eq!(p.field.as_deref(), Some("items[0].amount_minor"), "a name is named");
    }
}
