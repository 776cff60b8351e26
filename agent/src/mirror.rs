//! The registry mirror: the read side of the OCI distribution API, as containerd uses a mirror.
//!
//! The raw request path is parsed here (never percent-decoded) into a repository name and a reference by the
//! grammar in [`crate::oci`]; containerd names the registry in `?ns=`. The [`Resolver`] finds the bytes. Every
//! failure becomes an OCI error body in [`MirrorError::into_response`], the one place that maps errors to HTTP:
//! a miss the agent cannot serve is a fast 404, so containerd moves on to the next host in `hosts.toml`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use tracing::Instrument;

use crate::metrics::{Metrics, RequestLabels, Route, StatusClass};
use crate::oci::{Digest, ParseError, RangeError, RangeSpec, Reference, RegistryHost, RepoName};
use crate::resolver::{Client, Kind, Opened, ResolveError, Resolver};

/// An error answered to a mirror client.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The path, name, reference or digest is malformed.
    #[error("{message}")]
    BadRequest {
        /// OCI error code.
        code: &'static str,
        /// Why.
        message: String,
    },
    /// The method or path is not part of the read API (pushes, catalog).
    #[error("{0}")]
    Unsupported(&'static str),
    /// The manifest reference is neither a tag nor a digest: no manifest can have it (404, `MANIFEST_UNKNOWN`:
    /// the spec's codes have none for a malformed tag).
    #[error("{0}")]
    NoSuchReference(String),
    /// The `Range` header cannot be served.
    #[error("{error}")]
    Range {
        /// Why.
        error: RangeError,
        /// The blob's size, for `Content-Range: bytes */size`.
        size: u64,
    },
    /// The resolver could not serve it.
    #[error("{0}")]
    Resolve(#[from] ResolveError),
    /// No registry was named and none is configured as default.
    #[error("no registry given (?ns=) and no default_registry configured")]
    NoRegistry,
}

impl MirrorError {
    fn kind_code(kind: Kind) -> &'static str {
        match kind {
            Kind::Manifest => "MANIFEST_UNKNOWN",
            Kind::Blob => "BLOB_UNKNOWN",
        }
    }

    fn response(status: StatusCode, code: &str, message: &str) -> Response {
        let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
        (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
    }

    fn into_response_for(self, kind: Option<Kind>) -> Response {
        let unknown = kind.map_or("NAME_UNKNOWN", Self::kind_code);
        let msg = self.to_string();
        match self {
            Self::BadRequest { code, .. } => Self::response(StatusCode::BAD_REQUEST, code, &msg),
            Self::Unsupported(_) => Self::response(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", &msg),
            Self::NoSuchReference(_) => Self::response(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", &msg),
            Self::Range { size, .. } => {
                // The spec's codes have none for a range: the request asks for something this blob cannot give.
                let mut r = Self::response(StatusCode::RANGE_NOT_SATISFIABLE, "UNSUPPORTED", &msg);
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                r
            }
            Self::NoRegistry => Self::response(StatusCode::NOT_FOUND, "NAME_UNKNOWN", &msg),
            Self::Resolve(ResolveError::NotFound) => Self::response(StatusCode::NOT_FOUND, unknown, &msg),
            Self::Resolve(ResolveError::Unavailable(reason) | ResolveError::NoSpace(reason)) => {
                tracing::info!(%reason, "cannot serve: answering 404 so the client falls back");
                Self::response(StatusCode::NOT_FOUND, unknown, &msg)
            }
            Self::Resolve(ResolveError::Denied) => Self::response(StatusCode::FORBIDDEN, "DENIED", &msg),
            Self::Resolve(ResolveError::Unauthorized { challenge }) => {
                let mut r = Self::response(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", &msg);
                if let Some(c) = challenge {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, c);
                }
                r
            }
        }
    }
}

impl IntoResponse for MirrorError {
    fn into_response(self) -> Response {
        self.into_response_for(None)
    }
}

fn bad(code: &'static str, e: ParseError) -> MirrorError {
    MirrorError::BadRequest { code, message: e.to_string() }
}

/// Shared state of the mirror's handlers.
#[derive(Debug, Clone)]
pub struct MirrorState {
    /// The resolver.
    pub resolver: Arc<Resolver>,
    /// Metrics.
    pub metrics: Metrics,
}

/// The mirror's router.
pub fn router(state: MirrorState) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// What a path asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// `/v2/`.
    Base,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest(RepoName, Reference),
    /// `/v2/<name>/blobs/<digest>`.
    Blob(RepoName, Digest),
}

/// Parses a request's raw path (not percent-decoded: a valid name cannot hold `%`).
pub fn parse_path(path: &str) -> Result<Parsed, MirrorError> {
    let rest = path.strip_prefix("/v2").ok_or(MirrorError::Unsupported("not a registry API path"))?;
    if rest.is_empty() || rest == "/" {
        return Ok(Parsed::Base);
    }
    let rest = rest.strip_prefix('/').ok_or(MirrorError::Unsupported("not a registry API path"))?;
    if rest.contains("/blobs/uploads") {
        return Err(MirrorError::Unsupported("this mirror is read-only: pushes are not accepted"));
    }
    let (name, kind, reference) = if let Some(i) = rest.rfind("/manifests/") {
        (&rest[..i], "manifests", &rest[i + "/manifests/".len()..])
    } else if let Some(i) = rest.rfind("/blobs/") {
        (&rest[..i], "blobs", &rest[i + "/blobs/".len()..])
    } else {
        return Err(MirrorError::Unsupported("only manifests and blobs are served by this mirror"));
    };
    let name = RepoName::parse(name).map_err(|e| bad("NAME_INVALID", e))?;
    if kind == "manifests" {
        let r = Reference::parse(reference).map_err(|e| match e {
            ParseError::Digest(_) => bad("DIGEST_INVALID", e),
            _ => MirrorError::NoSuchReference(format!("{e}: not a tag or a digest, so no manifest has it")),
        })?;
        Ok(Parsed::Manifest(name, r))
    } else {
        let d = Digest::parse(reference).map_err(|e| bad("DIGEST_INVALID", e))?;
        Ok(Parsed::Blob(name, d))
    }
}

/// The registry named by `?ns=` (percent-decoded, then checked as `host[:port]`).
pub fn registry_param(query: Option<&str>) -> Result<Option<RegistryHost>, MirrorError> {
    let Some(q) = query else { return Ok(None) };
    for pair in q.split('&') {
        if let Some(v) = pair.strip_prefix("ns=") {
            let decoded = percent_decode(v).ok_or_else(|| bad("NAME_INVALID", ParseError::Host))?;
            return RegistryHost::parse(&decoded).map(Some).map_err(|e| bad("NAME_INVALID", e));
        }
    }
    Ok(None)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

async fn handle(State(state): State<MirrorState>, req: Request) -> Response {
    let span = tracing::debug_span!("request", method = %req.method(), path = %req.uri().path());
    handle_impl(state, req).instrument(span).await
}

async fn handle_impl(state: MirrorState, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let (route, kind) = match parse_path(&path) {
        Ok(Parsed::Base) => (Route::base, None),
        Ok(Parsed::Manifest(..)) => (Route::manifest, Some(Kind::Manifest)),
        Ok(Parsed::Blob(..)) => (Route::blob, Some(Kind::Blob)),
        Err(_) => (Route::other, None),
    };
    let resp = match serve(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response_for(kind),
    };
    let outcome = StatusClass::of(resp.status());
    state.metrics.mirror.requests.get_or_create(&RequestLabels { route, outcome }).inc();
    tracing::debug!(status = resp.status().as_u16(), "answered");
    resp
}

async fn serve(state: &MirrorState, req: Request) -> Result<Response, MirrorError> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return Err(MirrorError::Unsupported("this mirror is read-only: only GET and HEAD are accepted")),
    };
    let parsed = parse_path(req.uri().path())?;
    if parsed == Parsed::Base {
        let mut r = (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{}").into_response();
        r.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
        return Ok(r);
    }
    let registry = match registry_param(req.uri().query())? {
        Some(r) => r,
        None => state.resolver.upstream().default_registry().cloned().ok_or(MirrorError::NoRegistry)?,
    };
    let headers = req.headers();
    let client_for = |repo: RepoName| Client {
        registry: registry.clone(),
        repo,
        auth: headers.get(header::AUTHORIZATION).cloned().map(|mut a| {
            // Never printed (`Debug` of a sensitive value is `Sensitive`).
            a.set_sensitive(true);
            a
        }),
        accept: headers.get(header::ACCEPT).cloned(),
    };
    match parsed {
        Parsed::Base => unreachable!("answered above"),
        Parsed::Manifest(repo, reference) => {
            let client = client_for(repo);
            let digest = match reference {
                Reference::Digest(d) => d,
                Reference::Tag(t) => state.resolver.resolve_tag(&client, &t).await?,
            };
            let opened = state.resolver.open(&client, &digest, Kind::Manifest, head).await?;
            Ok(respond(state, opened, head, None)?)
        }
        Parsed::Blob(repo, digest) => {
            let client = client_for(repo);
            let range = headers
                .get(header::RANGE)
                .map(|v| v.to_str().map_err(|_| RangeError::Malformed).and_then(RangeSpec::parse))
                // A unit other than bytes, or several ranges: the header is ignored and the whole blob sent (RFC 9110
                // §14.2: a server must ignore an unknown unit and may ignore any range request).
                .filter(|r| !matches!(r, Err(RangeError::UnknownUnit | RangeError::Multiple)));
            let opened = state.resolver.open(&client, &digest, Kind::Blob, head).await?;
            Ok(respond(state, opened, head, range)?)
        }
    }
}

fn respond(
    state: &MirrorState,
    opened: Opened,
    head: bool,
    range: Option<Result<RangeSpec, RangeError>>,
) -> Result<Response, MirrorError> {
    let mut headers = HeaderMap::new();
    let mt = opened.media_type.as_deref().unwrap_or("application/octet-stream");
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(mt).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    headers.insert(
        "docker-content-digest",
        HeaderValue::from_str(opened.digest.as_str()).expect("a parsed digest is a valid header value"),
    );
    headers.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{}\"", opened.digest)).expect("a parsed digest is a valid header value"),
    );
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let (status, start, end) = match (opened.size, range) {
        (Some(size), Some(spec)) => {
            let (start, end) =
                spec.and_then(|s| s.resolve(size)).map_err(|error| MirrorError::Range { error, size })?;
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1))
                    .expect("digits are a valid header value"),
            );
            (StatusCode::PARTIAL_CONTENT, start, end)
        }
        (Some(size), None) => (StatusCode::OK, 0, size),
        // Unknown length (upstream sent none): the whole body, chunked.
        (None, _) => (StatusCode::OK, 0, u64::MAX),
    };
    if end != u64::MAX {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    }
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(opened.stream(start, end, &state.metrics, state.resolver.response_budget()))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok(resp)
}

pub mod server;

#[cfg(test)]
mod tests;
