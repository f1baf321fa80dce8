//! The demo's validator plugin in Rust: `demo.v1.ValidatorService` from
//! `examples/proto/demo/v1/demo.proto`, the same rules as the Go one
//! (`examples/validator`).

#![forbid(unsafe_code)]

use std::pin::Pin;

use opf::tonic::{self, Request, Response, Status, Streaming};
use prost::Message as _;
use tokio_stream::{Stream, StreamExt as _};

/// Code generated from `examples/proto` by `cargo run -p codegen`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod demo {
    /// `demo.v1`.
    pub mod v1 {
        include!("gen/demo.v1.rs");
    }
    pub use v1::*;
}

use demo::validator_service_server::ValidatorService;
use demo::*;

/// Metadata the validator reads and sets, as the Go one does.
pub const REQUEST_ID_KEY: &str = "x-request-id";
/// The deadline the handler saw, as a response header.
pub const DEADLINE_LEFT_KEY: &str = "x-deadline-left";
/// How many rules were evaluated, as a trailer.
pub const RULES_EVALUATED_KEY: &str = "x-rules-evaluated";

/// The validator service.
#[derive(Debug, Default, Clone)]
pub struct Validator;

struct Rule {
    name: &'static str,
    description: &'static str,
    check: fn(&Resource) -> Option<String>,
}

fn dns_label(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

const RULES: [Rule; 3] = [
    Rule {
        name: "team-label",
        description: "every resource has a \"team\" label",
        check: |r| r.labels.get("team").is_none_or(|t| t.is_empty()).then(|| "no \"team\" label".into()),
    },
    Rule {
        name: "no-default-namespace",
        description: "nothing lives in the default namespace",
        check: |r| (r.namespace.is_empty() || r.namespace == "default").then(|| "in the default namespace".into()),
    },
    Rule {
        name: "dns-label-name",
        description: "names are DNS labels: at most 63 lower-case letters, digits and '-'",
        check: |r| (!dns_label(&r.name)).then(|| format!("name {:?} is not a DNS label", r.name)),
    },
];

/// The verdict on one resource.
pub fn check(r: &Resource) -> Verdict {
    let violations: Vec<Violation> = RULES
        .iter()
        .filter_map(|rule| (rule.check)(r).map(|message| Violation { rule: rule.name.into(), message }))
        .collect();
    Verdict { resource: format!("{}/{}", r.namespace, r.name), allowed: violations.is_empty(), violations }
}

/// `google.rpc.BadRequest`, for the status details.
#[derive(Clone, PartialEq, prost::Message)]
struct BadRequest {
    #[prost(message, repeated, tag = "1")]
    field_violations: Vec<FieldViolation>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct FieldViolation {
    #[prost(string, tag = "1")]
    field: String,
    #[prost(string, tag = "2")]
    description: String,
}

/// `google.rpc.Status`, which tonic's details carry encoded.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

fn bad_request(field: &str, problem: &str) -> Status {
    let message = format!("{field} {problem}");
    let detail =
        BadRequest { field_violations: vec![FieldViolation { field: field.into(), description: problem.into() }] };
    let details = RpcStatus {
        code: tonic::Code::InvalidArgument as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: "type.googleapis.com/google.rpc.BadRequest".into(),
            value: detail.encode_to_vec(),
        }],
    };
    Status::with_details(tonic::Code::InvalidArgument, message, details.encode_to_vec().into())
}

fn check_resource(r: Option<&Resource>) -> Result<&Resource, Status> {
    match r {
        None => Err(bad_request("resource", "is required")),
        Some(r) if r.name.is_empty() => Err(bad_request("resource.name", "is required")),
        Some(r) => Ok(r),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ValidatorService for Validator {
    async fn validate(&self, req: Request<ValidateRequest>) -> Result<Response<ValidateResponse>, Status> {
        let left = match req.extensions().get::<opf::Deadline>() {
            Some(d) => format!("{}ms", d.remaining().as_millis()),
            None => "none".into(),
        };
        let mut headers = tonic::metadata::MetadataMap::new();
        headers.insert(DEADLINE_LEFT_KEY, left.parse().map_err(|_| Status::internal("header"))?);
        for id in req.metadata().get_all(REQUEST_ID_KEY) {
            headers.append(REQUEST_ID_KEY, id.clone());
        }
        // Headers and trailers in any outcome, as grpc-go's SetHeader and
        // SetTrailer do: the SDK's ResponseMetadata.
        let md = req.extensions().get::<opf::ResponseMetadata>().cloned();
        if let Some(md) = &md {
            md.add_headers(headers.clone());
        }
        let resource = check_resource(req.get_ref().resource.as_ref())?;
        let verdict = check(resource);
        let mut trailers = tonic::metadata::MetadataMap::new();
        trailers.insert(RULES_EVALUATED_KEY, RULES.len().to_string().parse().expect("digits"));
        let mut resp = Response::new(ValidateResponse { verdict: Some(verdict) });
        match &md {
            Some(md) => md.add_trailers(trailers),
            None => *resp.metadata_mut() = headers,
        }
        Ok(resp)
    }

    type ListRulesStream = BoxStream<ListRulesResponse>;

    async fn list_rules(&self, _: Request<ListRulesRequest>) -> Result<Response<Self::ListRulesStream>, Status> {
        let rules = RULES.iter().map(|r| {
            Ok(ListRulesResponse { rule: Some(demo::Rule { name: r.name.into(), description: r.description.into() }) })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(rules))))
    }

    async fn validate_batch(
        &self,
        req: Request<Streaming<ValidateBatchRequest>>,
    ) -> Result<Response<ValidateBatchResponse>, Status> {
        let mut stream = req.into_inner();
        let mut resp = ValidateBatchResponse::default();
        while let Some(r) = stream.message().await? {
            let resource = check_resource(r.resource.as_ref())?;
            resp.checked += 1;
            let v = check(resource);
            if !v.allowed {
                resp.denied.push(v);
            }
        }
        Ok(Response::new(resp))
    }

    type ReviewStream = BoxStream<ReviewResponse>;

    async fn review(&self, req: Request<Streaming<ReviewRequest>>) -> Result<Response<Self::ReviewStream>, Status> {
        let stream = req.into_inner().map(|r| {
            let r = r?;
            let resource = check_resource(r.resource.as_ref())?;
            Ok(ReviewResponse { verdict: Some(check(resource)) })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let mut r = Resource { name: "web".into(), namespace: "shop".into(), ..Default::default() };
        r.labels.insert("team".into(), "a".into());
        assert!(check(&r).allowed);
        r.name = "Web_1".into();
        r.namespace = "default".into();
        let v = check(&r);
        let broken: Vec<_> = v.violations.iter().map(|v| v.rule.as_str()).collect();
        assert_eq!(broken, ["no-default-namespace", "dns-label-name"]);
        assert!(!dns_label("-a") && !dns_label("") && dns_label("a-1") && !dns_label(&"a".repeat(64)));
    }
}
