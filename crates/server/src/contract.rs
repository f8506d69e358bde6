//! What the generated OpenAPI document says beyond each route's own annotations: the security
//! schemes, problems as `application/problem+json`, and the answers every route can give whatever
//! it does (a missing credential, a malformed body, the tenant's rate, storage away). Without
//! these a client generated from `/openapi.json` would meet statuses its document never named.

use utoipa::openapi::header::Header;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::response::Response;
use utoipa::openapi::schema::{KnownFormat, Object, Schema, SchemaFormat, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr};

/// The media type of every error answer (RFC 9457).
pub const PROBLEM: &str = "application/problem+json";

pub struct Contract;

impl utoipa::Modify for Contract {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("api_key", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        components.add_security_scheme("operator", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        for item in openapi.paths.paths.values_mut() {
            for operation in
                [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
            {
                complete(operation);
            }
        }
        // Sets whose members live in tables of the code, not in a type: listed where the body
        // takes one, so a client (or a generator of requests) knows them without trying.
        let currencies: Vec<String> = ledger::Currency::all().map(|c| c.as_str().to_owned()).collect();
        for schema in ["AccountBody", "ProductBody"] {
            enumerate(components, schema, "currency", false, &currencies);
        }
        let scopes: Vec<String> = crate::oauth::SCOPES.iter().map(|s| (*s).to_owned()).collect();
        enumerate(components, "OAuthClientBody", "scopes", true, &scopes);
    }
}

/// Gives the property `property` of the component `schema` (or its items, for an array) the
/// values it may take.
fn enumerate(
    components: &mut utoipa::openapi::Components,
    schema: &str,
    property: &str,
    items: bool,
    values: &[String],
) {
    let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(schema) else {
        panic!("the document has no object schema {schema}");
    };
    let target = match object.properties.get_mut(property) {
        Some(RefOr::T(Schema::Array(array))) if items => match &mut array.items {
            utoipa::openapi::schema::ArrayItems::RefOrSchema(item) => item.as_mut(),
            utoipa::openapi::schema::ArrayItems::False => panic!("{schema}.{property} takes no items"),
        },
        Some(other) if !items => other,
        _ => panic!("{schema} has no {} {property}", if items { "array" } else { "property" }),
    };
    let RefOr::T(Schema::Object(target)) = target else { panic!("{schema}.{property} is not an inline schema") };
    target.enum_values = Some(values.iter().map(|v| serde_json::Value::from(v.as_str())).collect());
    target.pattern = None;
}

/// The path segments that name a resource by its id: every one is a UUID.
const ID_SEGMENTS: [&str; 3] = ["id", "pending_id", "key_id"];

/// Adds to `operation` the answers it can give besides its own, names problems' media type, and
/// gives its path ids their format.
fn complete(operation: &mut Operation) {
    for parameter in operation.parameters.iter_mut().flatten() {
        if parameter.parameter_in == ParameterIn::Path && ID_SEGMENTS.contains(&parameter.name.as_str()) {
            if let Some(RefOr::T(Schema::Object(object))) = &mut parameter.schema {
                object.format.get_or_insert(SchemaFormat::KnownFormat(KnownFormat::Uuid));
            }
        }
    }
    let responses = &mut operation.responses.responses;
    for response in responses.values_mut() {
        if let RefOr::T(response) = response {
            as_problem(response);
        }
    }
    let secured = operation.security.as_ref().is_some_and(|s| !s.is_empty());
    let has_body = operation.request_body.is_some();
    let has_parameters = operation.parameters.as_ref().is_some_and(|p| !p.is_empty());
    let mut common: Vec<(&str, &str, bool)> = Vec::new();
    if has_body || has_parameters || secured {
        common.push((
            "400",
            "the body is not JSON or cannot be read (a broken chunked encoding), a path segment is not UTF-8, or a header that decides how the request is read (Authorization, Content-Type) is given twice",
            false,
        ));
    }
    if has_body {
        common.push(("413", "the body is larger than the server accepts", false));
        common.push(("415", "the body's Content-Type is not JSON", false));
    }
    if secured {
        common.push(("401", "no credential, or one that is unknown, revoked or expired", false));
        common.push((
            "403",
            "the credential lacks the scope, or the connection's client certificate is bound to another caller",
            false,
        ));
        common.push((
            "429",
            "a request rate is reached, or too many authentications failed from this address or for this credential (see Retry-After)",
            true,
        ));
    }
    if has_body || has_parameters {
        common.push(("422", "a field, path segment or query parameter breaks its rule (the problem names it)", false));
    }
    common.push((
        "503",
        "temporarily unable to serve (storage away, a service not configured or unreachable); retry after Retry-After with the same id or Idempotency-Key",
        true,
    ));
    for (status, description, retry_after) in common {
        responses.entry(status.to_owned()).or_insert_with(|| RefOr::T(problem(description, retry_after)));
    }
    // A route's own 429 or 503 comes with `Retry-After` too.
    for status in ["429", "503"] {
        if let Some(RefOr::T(response)) = responses.get_mut(status) {
            response.headers.entry("Retry-After".to_owned()).or_insert_with(retry_after);
        }
    }
}

fn retry_after() -> Header {
    let mut header = Header::new(Object::with_type(Type::Integer));
    header.description = Some("seconds to wait before retrying".to_owned());
    header
}

/// A problem answer, with `Retry-After` when the client should wait.
fn problem(description: &str, retry_after: bool) -> Response {
    let mut response = Response::new(description);
    response.content.insert(PROBLEM.to_owned(), Content::new(Some(Ref::from_schema_name("Problem"))));
    if retry_after {
        response.headers.insert("Retry-After".to_owned(), self::retry_after());
    }
    response
}

/// A body documented as `Problem` in `application/json` is served as `application/problem+json`.
fn as_problem(response: &mut Response) {
    let is_problem =
        |content: &Content| matches!(&content.schema, Some(RefOr::Ref(r)) if r.ref_location.ends_with("/Problem"));
    if let Some(index) = response.content.get_index_of("application/json") {
        if is_problem(&response.content[index]) {
            if let Some(content) = response.content.shift_remove("application/json") {
                response.content.insert(PROBLEM.to_owned(), content);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi;

    #[test]
    fn every_operation_documents_its_common_answers_and_problems_as_problem_json() {
        let doc = serde_json::to_value(crate::ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut operations = 0;
        for (path, item) in paths {
            for (method, operation) in item.as_object().unwrap() {
                operations += 1;
                let responses = operation["responses"].as_object().unwrap();
                for (status, response) in responses {
                    let content = response["content"].as_object().cloned().unwrap_or_default();
                    for (media, body) in content {
                        let is_problem = body["schema"]["$ref"] == "#/components/schemas/Problem";
                        assert!(!is_problem || media == super::PROBLEM, "{method} {path} {status}: {media}");
                    }
                }
                assert!(responses.contains_key("503"), "{method} {path}");
                assert!(responses["503"]["headers"].get("Retry-After").is_some(), "{method} {path}");
                if operation["security"].as_array().is_some_and(|s| !s.is_empty()) {
                    for status in ["401", "403", "429"] {
                        assert!(responses.contains_key(status), "{method} {path} lacks {status}");
                    }
                }
                if operation.get("requestBody").is_some() {
                    for status in ["400", "413", "415", "422"] {
                        assert!(responses.contains_key(status), "{method} {path} lacks {status}");
                    }
                }
                for parameter in operation["parameters"].as_array().into_iter().flatten() {
                    let name = parameter["name"].as_str().unwrap();
                    if parameter["in"] == "path" && super::ID_SEGMENTS.contains(&name) {
                        assert_eq!(parameter["schema"]["format"], "uuid", "{method} {path} {name}");
                    }
                }
            }
        }
        assert!(operations > 40, "{operations} operations");
    }

    /// Types that share a Rust name are told apart in the document (one schema name for both made
    /// a card's limits read as a holder's Pix limits); rules a schema can say are there.
    #[test]
    fn schemas_say_the_rules_a_schema_can_say() {
        let doc = serde_json::to_value(crate::ApiDoc::openapi()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let fields = |name: &str| -> Vec<String> {
            let mut keys: Vec<String> = schemas[name]["properties"].as_object().unwrap().keys().cloned().collect();
            keys.sort();
            keys
        };
        assert_eq!(fields("CardLimits"), ["daily", "monthly", "per_transaction"]);
        assert_eq!(fields("PixLimits"), ["daily", "night_per_transaction", "nightly", "per_transaction"]);
        assert!(schemas.get("LimitsBody").is_none());
        let card_limits = doc["components"]["schemas"]["CardBody"]["properties"]["limits"].to_string();
        assert!(card_limits.contains("#/components/schemas/CardLimits"), "{card_limits}");
        let void =
            &doc["paths"]["/v1/transfers/{pending_id}/void"]["post"]["requestBody"]["content"]["application/json"];
        assert_eq!(void["schema"]["$ref"], "#/components/schemas/VoidBody");
        assert_eq!(fields("VoidBody"), ["code", "id", "metadata"]);
        let currencies = schemas["AccountBody"]["properties"]["currency"]["enum"].as_array().unwrap();
        assert!(currencies.contains(&"BRL".into()) && currencies.contains(&"JPY".into()));
        assert!(!currencies.contains(&"XAU".into()), "metals are not money here");
        let scopes = schemas["OAuthClientBody"]["properties"]["scopes"]["items"]["enum"].as_array().unwrap();
        assert_eq!(scopes.len(), crate::oauth::SCOPES.len());
        let limit = doc["paths"]["/v1/accounts/{id}/transfers"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "limit")
            .unwrap()["schema"]
            .clone();
        assert_eq!((limit["minimum"].as_u64(), limit["maximum"].as_u64()), (Some(1), Some(1000)));
    }
}
