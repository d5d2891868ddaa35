//! `wasi:http` for `wasi:http/proxy` components. Incoming requests reach the
//! guest through the queue like any task. Outgoing requests go out only to
//! the hosts the app's `[runtime] allowed_outbound_hosts` lists; anything
//! else is refused with `HTTP-request-denied`.

use std::sync::Arc;

use http_body_util::BodyExt as _;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// Set on every request a guest sends: a node refuses such requests that
/// would manage apps (see `gateway::errors::refuse_loops`), whatever hosts
/// the app may reach.
pub(crate) const GUEST_HEADER: &str = "x-beamlet-guest";

/// The app's outbound allow-list: `host` (any port) or `host:port` entries.
pub(crate) struct Outbound {
    allowed: Arc<[String]>,
}

type Sent = Box<dyn Future<Output = Result<(), Error>> + Send>;

impl Outbound {
    pub(crate) fn new(allowed: Arc<[String]>) -> Self {
        Self { allowed }
    }

    fn allows(&self, uri: &http::Uri) -> bool {
        let Some(host) = uri.host() else { return false };
        let port = uri.port_u16().unwrap_or(if uri.scheme() == Some(&http::uri::Scheme::HTTPS) { 443 } else { 80 });
        self.allowed.iter().any(|entry| match entry.rsplit_once(':') {
            Some((allowed_host, allowed_port)) if !allowed_host.ends_with(']') || entry.starts_with('[') => {
                allowed_host.eq_ignore_ascii_case(host) && allowed_port.parse() == Ok(port)
            }
            _ => entry.eq_ignore_ascii_case(host),
        })
    }
}

impl WasiHttpHooks for Outbound {
    /// Writes a guest may have in flight before its response body stream
    /// pushes back: with one (the default), each small write suspends the
    /// guest until the reader has taken the previous one.
    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        16
    }

    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Sent,
    ) -> Box<dyn Future<Output = wasmtime_wasi_http::Result<(http::Response<WasiBody>, Sent)>> + Send> {
        if !self.allows(request.uri()) {
            tracing::debug!(uri = %request.uri(), "outbound HTTP denied: host not in allowed_outbound_hosts");
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        request.headers_mut().insert(GUEST_HEADER, http::HeaderValue::from_static("1"));
        Box::new(async move {
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((response.map(|body| body.boxed_unsync()), Box::new(io) as Sent))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_matches_hosts_and_ports() {
        let outbound = Outbound::new(vec!["example.com".to_owned(), "127.0.0.1:8080".to_owned()].into());
        let allows = |uri: &str| outbound.allows(&uri.parse().unwrap());
        assert!(allows("http://example.com/"));
        assert!(allows("https://EXAMPLE.com:8443/x"), "a bare host allows any port");
        assert!(allows("http://127.0.0.1:8080/"));
        assert!(!allows("http://127.0.0.1:9090/"), "a host:port entry allows only that port");
        assert!(!allows("http://127.0.0.1/"), "port 80 is not 8080");
        assert!(!allows("http://evil.example.com/"));
        assert!(!Outbound::new(Vec::new().into()).allows(&"http://example.com/".parse().unwrap()));
    }
}
