//! The operator web UI (`--ui-listen`): one HTTP/1.1 port serving, under
//! `--ui-base-path`, the single-page app built in `web/` and gRPC-Web to the same
//! RunService, SessionService, AdminService and WebhookService as the gRPC port. The app
//! is a client like any other: the same handlers, API keys, tenant scoping and limits,
//! no second API.
//!
//! The app's three files are embedded at compile time from `web/dist` (committed, and
//! rebuilt and diffed by `scripts/web-test.sh`), so building the manager needs no Node.
//! Routing in the app is by URL fragment: every other GET under the base path answers
//! with `index.html`, whose `%BASE_PATH%` becomes the base path (its `<base href>`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Redirect, Response};
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use tonic::service::{Routes, RoutesBuilder};
use tower_service::Service;

use crate::metrics::Metrics;
use crate::observe::ObserveLayer;
use crate::wire_errors::WireErrorsLayer;

/// The app's files, embedded by path under the base path.
const INDEX_HTML: &str = include_str!("../../web/dist/index.html");
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "assets/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../web/dist/assets/app.js"),
    ),
    (
        "assets/app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../web/dist/assets/app.css"),
    ),
];

/// The app's pages: scripts, styles, connections and everything else from this port
/// only (the app sets styles through the DOM, which this allows), never framed.
/// `web/tests` fails on any violation the app's pages report.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; \
     object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'";

/// Where the UI is served: its address and base path, both checked.
#[derive(Debug, Clone)]
pub struct UiAddress {
    pub listen: SocketAddr,
    /// Starts and ends with `/`.
    pub base_path: String,
}

impl UiAddress {
    /// `None` when `listen` is empty (the UI is off).
    pub fn parse(listen: &str, base_path: &str) -> anyhow::Result<Option<Self>> {
        if listen.trim().is_empty() {
            return Ok(None);
        }
        let listen = listen
            .parse()
            .map_err(|err| anyhow::anyhow!("--ui-listen {listen:?}: {err}"))?;
        Ok(Some(Self {
            listen,
            base_path: base_path_of(base_path)?,
        }))
    }

    /// The address to open in a browser.
    pub fn url(&self, bound: SocketAddr) -> String {
        format!("http://{bound}{}", self.base_path)
    }
}

/// `path` as a base path: absolute, of plain URL path characters, ending with `/`.
fn base_path_of(path: &str) -> anyhow::Result<String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-._~/".contains(c);
    anyhow::ensure!(
        path.starts_with('/')
            && path.chars().all(plain)
            && !path.contains("//")
            && !path.split('/').any(|part| part == "." || part == ".."),
        "--ui-base-path (AGENTRUN_UI_BASE_PATH) must be an absolute URL path of letters, \
         digits and `-._~/`, without `//`, `.` or `..` segments, such as `/` or \
         `/agentrun/`; not {path:?}"
    );
    Ok(if path.ends_with('/') {
        path.to_owned()
    } else {
        format!("{path}/")
    })
}

/// The UI port's routes: the `api` services spoken as gRPC-Web (observed and their
/// errors mapped as on the gRPC port), and the app's files, all under `base_path`.
/// `loopback_only` (no authentication) answers only requests addressed to loopback
/// ([`addressed_to_loopback`]).
pub fn routes(
    api: RoutesBuilder,
    base_path: &str,
    metrics: Arc<Metrics>,
    loopback_only: bool,
) -> Routes {
    let index: Arc<str> = INDEX_HTML.replace("%BASE_PATH%", base_path).into();
    let app = api
        .routes()
        .into_axum_router()
        .layer(WireErrorsLayer)
        .layer(ObserveLayer::new(metrics))
        .layer(tonic_web::GrpcWebLayer::new())
        // Whatever no service takes: the app's files (added after the layers, which
        // would otherwise refuse a request that is not gRPC-Web).
        .fallback(move |method: Method, uri: Uri| {
            let index = index.clone();
            async move { file(&method, uri.path().trim_start_matches('/'), &index) }
        });
    let router = if base_path == "/" {
        app
    } else {
        Router::new().fallback_service(UnderBase {
            base: base_path.into(),
            inner: app,
        })
    };
    if !loopback_only {
        return Routes::from(router);
    }
    Routes::from(router.layer(axum::middleware::from_fn(
        |request: Request<Body>, next: axum::middleware::Next| async move {
            match addressed_to_loopback(&request) {
                Ok(()) => next.run(request).await,
                Err(refused) => (StatusCode::FORBIDDEN, refused).into_response(),
            }
        },
    )))
}

/// Without authentication (allowed only on a loopback address) the UI answers only
/// requests addressed to a loopback name or address. Any web page can make a browser
/// send requests to 127.0.0.1; a page whose own name its owner re-points there (DNS
/// rebinding) is even same-origin with the UI, and could read every run and create and
/// steer runs — but its requests still carry its own name as Host, and are refused
/// (the error says why).
fn addressed_to_loopback(request: &Request<Body>) -> Result<(), String> {
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers().get(header::HOST)?.to_str().ok())
        .unwrap_or("");
    let host = match authority.rsplit_once(':') {
        // A port after the host (an IPv6 address is in brackets: `[::1]:7401`).
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let loopback = host == "localhost"
        || host.ends_with(".localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        return Ok(());
    }
    Err(format!(
        "this UI runs without authentication and answers only requests addressed to \
         localhost or a loopback address, not to {authority:?}: open it as \
         http://127.0.0.1:<port>/, or run the manager with --auth required\n"
    ))
}

/// Serves `inner` under `base` (ending with `/`): a request there reaches it without the
/// base's prefix, `base` without its slash is redirected, anything else is not found.
#[derive(Clone)]
struct UnderBase {
    base: Arc<str>,
    inner: Router,
}

impl Service<Request<Body>> for UnderBase {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<Request<Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let rewritten = match path.strip_prefix(self.base.trim_end_matches('/')) {
            Some("") => Err(Redirect::permanent(&self.base).into_response()),
            Some(rest) if rest.starts_with('/') => {
                let query = request
                    .uri()
                    .query()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default();
                Ok(format!("{rest}{query}"))
            }
            _ => Err((StatusCode::NOT_FOUND, "not found").into_response()),
        };
        match rewritten.map(|uri| uri.parse::<Uri>()) {
            Ok(Ok(uri)) => {
                *request.uri_mut() = uri;
                Box::pin(self.inner.call(request))
            }
            Ok(Err(_)) => {
                let response = (StatusCode::BAD_REQUEST, "bad path").into_response();
                Box::pin(async move { Ok(response) })
            }
            Err(response) => Box::pin(async move { Ok(response) }),
        }
    }
}

/// The embedded file at `path` (relative to the base path), else the app's page. A call
/// to a method this port does not serve is UNIMPLEMENTED, as on the gRPC port.
fn file(method: &Method, path: &str, index: &str) -> Response {
    if method != Method::GET && method != Method::HEAD {
        let mut response = Response::new(Body::empty());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc-web+proto"),
        );
        headers.insert(
            "grpc-status",
            HeaderValue::from(tonic::Code::Unimplemented as i32),
        );
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("not%20served%20on%20the%20UI%20port"),
        );
        return response;
    }
    let (content_type, body): (&str, Body) = match ASSETS.iter().find(|(name, _, _)| *name == path)
    {
        Some((_, content_type, bytes)) => (content_type, Body::from(*bytes)),
        None if path.starts_with("assets/") => {
            return (StatusCode::NOT_FOUND, "no such asset").into_response();
        }
        None => ("text/html; charset=utf-8", Body::from(index.to_owned())),
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Asset names carry no hash: the browser must ask again after an upgrade.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // No other site may frame the app (and trick an operator's clicks), and the page
    // runs only the app's own script and talks only to this port: text a run carries
    // can never become script, even if some rendering path let markup through.
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_paths_are_checked_and_end_with_a_slash() {
        assert_eq!(base_path_of("/").unwrap(), "/");
        assert_eq!(base_path_of("/agentrun").unwrap(), "/agentrun/");
        assert_eq!(base_path_of("/a/b-c_d/").unwrap(), "/a/b-c_d/");
        for bad in [
            "", "ui", "/a//b", "/a/../b", "/a/./b", "/a b", "/a?x", "/\"x",
        ] {
            let err = base_path_of(bad).unwrap_err().to_string();
            assert!(err.contains("--ui-base-path"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn an_empty_listen_address_turns_the_ui_off() {
        assert!(UiAddress::parse("", "/").unwrap().is_none());
        let err = UiAddress::parse("nowhere", "/").unwrap_err().to_string();
        assert!(err.contains("--ui-listen"), "{err}");
    }
}
