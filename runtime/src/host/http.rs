//! `wasi:http` for `wasi:http/proxy` components. Incoming requests reach the
//! guest through the queue like any task; outgoing requests are refused
//! (`HTTP-request-denied`): a guest gets no network unless an app's config
//! grants it, and no config key grants outbound HTTP yet.

use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// Refuses every outgoing request.
pub(crate) struct DenyOutbound;

type Sent = Box<dyn Future<Output = Result<(), Error>> + Send>;

impl WasiHttpHooks for DenyOutbound {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Sent,
    ) -> Box<dyn Future<Output = wasmtime_wasi_http::Result<(http::Response<WasiBody>, Sent)>> + Send> {
        tracing::debug!(uri = %request.uri(), "outbound HTTP denied");
        Box::new(async { Err(Error::HttpRequestDenied) })
    }
}
