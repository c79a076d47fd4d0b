//! `--api-key` (Bearer tokens, OpenAI-style 401) and `--cors ORIGIN` (off by default).
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::Arc;

pub struct Access {
    pub api_key: Option<String>,
    /// Allowed origins; `*` allows any.
    pub cors: Vec<String>,
}

/// Routes that answer without a key.
const PUBLIC: &[&str] = &["/health"];

fn same(a: &[u8], b: &[u8]) -> bool {
    // Constant time for equal lengths.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub async fn auth(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let Some(key) = &access.api_key else {
        return next.run(req).await;
    };
    if PUBLIC.contains(&req.uri().path()) || req.method() == Method::OPTIONS {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    if given.is_some_and(|g| same(g.as_bytes(), key.as_bytes())) {
        return next.run(req).await;
    }
    let message = if given.is_none() {
        "no API key: send `Authorization: Bearer KEY` (this server was started with --api-key)"
    } else {
        "invalid API key: send the key the server was started with (--api-key) as `Authorization: Bearer KEY`"
    };
    let mut r = (
        StatusCode::UNAUTHORIZED,
        axum::Json(
            json!({"error": {"message": message, "type": "invalid_request_error",
            "param": null, "code": "invalid_api_key"}}),
        ),
    )
        .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

pub async fn cors(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let allowed = match &origin {
        Some(o) if !access.cors.is_empty() => {
            if access.cors.iter().any(|c| c == "*") {
                Some(HeaderValue::from_static("*"))
            } else if access.cors.iter().any(|c| c.as_bytes() == o.as_bytes()) {
                Some(o.clone())
            } else {
                None
            }
        }
        _ => None,
    };
    let Some(allow) = allowed else {
        return next.run(req).await;
    };
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut r = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            req.headers()
                .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                .cloned()
                .unwrap_or(HeaderValue::from_static("authorization, content-type")),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(req).await
    };
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    r
}
