//! Test fixture: a plain `wasi:http/proxy` component, written with the `wasi`
//! crate and no beamlet SDK.
//!
//! - `/hello`: 200 `Hello, world!` (the benchmark's Rust hello)
//! - `/echo`: 200 with `x-method`, `x-path` (path and query) and `x-echo`
//!   (the request's `x-test` header); the body is the request body
//! - `/status/{code}`: that status, body `status {code}`
//! - `/big?bytes=N`: N bytes of `x`
//! - `/pipe`: 200 at once, then streams the request body back as it arrives,
//!   part by part (both bodies stream; nothing is held whole)
//! - `/partial`: sends its head and 1 MiB of body, then panics
//! - `/trap`: panics
//! - `/after?[ms=N][&spin][&trap]`: 200 `done` (complete), then work after
//!   the response: waits N ms in the host, spins without calling the host
//!   (until stopped), panics; or returns
//! - `/outbound[?to=HOST:PORT]`: tries `GET http://HOST:PORT/` (default
//!   example.com) and reports what happened
//! - anything else: 404 with `x-path`

use std::io::{Read as _, Write as _};

use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam, Scheme,
};

struct Handler;

wasi::http::proxy::export!(Handler);

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET".into(),
        Method::Post => "POST".into(),
        Method::Put => "PUT".into(),
        Method::Delete => "DELETE".into(),
        Method::Patch => "PATCH".into(),
        Method::Head => "HEAD".into(),
        Method::Options => "OPTIONS".into(),
        Method::Connect => "CONNECT".into(),
        Method::Trace => "TRACE".into(),
        Method::Other(other) => other.clone(),
    }
}

fn respond(out: ResponseOutparam, status: u16, headers: &[(&str, Vec<u8>)], body: &[u8]) {
    let fields = Fields::new();
    for (name, value) in headers {
        fields.append(name, value).expect("valid header");
    }
    let response = OutgoingResponse::new(fields);
    response.set_status_code(status).expect("valid status");
    let outgoing = response.body().expect("body taken once");
    ResponseOutparam::set(out, Ok(response));
    let mut stream = outgoing.write().expect("stream taken once");
    for chunk in body.chunks(4096) {
        stream.write_all(chunk).expect("write body");
    }
    stream.flush().expect("flush body");
    drop(stream);
    OutgoingBody::finish(outgoing, None).expect("finish body");
}

fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let body = request.consume().expect("body consumed once");
    let mut bytes = Vec::new();
    {
        let mut stream = body.stream().expect("stream taken once");
        stream.read_to_end(&mut bytes).expect("read body");
    }
    bytes
}

/// Writes each part of the request body back as soon as it is read.
fn pipe(request: &IncomingRequest, out: ResponseOutparam) {
    let body = request.consume().expect("body consumed once");
    let input = body.stream().expect("stream taken once");
    let response = OutgoingResponse::new(Fields::new());
    let outgoing = response.body().expect("body taken once");
    ResponseOutparam::set(out, Ok(response));
    let mut output = outgoing.write().expect("stream taken once");
    loop {
        match input.blocking_read(64 * 1024) {
            Ok(part) => {
                for chunk in part.chunks(4096) {
                    output.write_all(chunk).expect("write body");
                }
                output.flush().expect("flush body");
            }
            Err(wasi::io::streams::StreamError::Closed) => break,
            Err(e) => panic!("reading the request body failed: {e:?}"),
        }
    }
    drop(output);
    OutgoingBody::finish(outgoing, None).expect("finish body");
}

fn outbound(authority: &str) -> String {
    let request = OutgoingRequest::new(Fields::new());
    request.set_scheme(Some(&Scheme::Http)).unwrap();
    request.set_authority(Some(authority)).unwrap();
    request.set_path_with_query(Some("/")).unwrap();
    match wasi::http::outgoing_handler::handle(request, None) {
        Err(error) => format!("denied: {error:?}"),
        Ok(future) => {
            let pollable = future.subscribe();
            pollable.block();
            match future.get() {
                Some(Ok(Ok(response))) => format!("allowed: {}", response.status()),
                Some(Ok(Err(error))) => format!("denied: {error:?}"),
                other => format!("failed: {other:?}"),
            }
        }
    }
}

impl wasi::exports::http::incoming_handler::Guest for Handler {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path_with_query = request.path_with_query().unwrap_or_default();
        let (path, query) = path_with_query.split_once('?').unwrap_or((&path_with_query, ""));
        match path {
            "/hello" => respond(out, 200, &[], b"Hello, world!\n"),
            "/echo" => {
                let echo = request.headers().get("x-test").into_iter().next().unwrap_or_default();
                let headers = [
                    ("x-method", method_name(&request.method()).into_bytes()),
                    ("x-path", path_with_query.clone().into_bytes()),
                    ("x-echo", echo),
                ];
                let body = read_body(&request);
                respond(out, 200, &headers, &body);
            }
            "/big" => {
                let bytes = query.strip_prefix("bytes=").and_then(|n| n.parse().ok()).unwrap_or(0);
                respond(out, 200, &[], &vec![b'x'; bytes]);
            }
            "/pipe" => pipe(&request, out),
            "/partial" => {
                let response = OutgoingResponse::new(Fields::new());
                let outgoing = response.body().expect("body taken once");
                ResponseOutparam::set(out, Ok(response));
                let mut stream = outgoing.write().expect("stream taken once");
                for chunk in vec![b'p'; 1 << 20].chunks(4096) {
                    stream.write_all(chunk).expect("write body");
                }
                stream.flush().expect("flush body");
                panic!("http guest trapped halfway through its body");
            }
            "/trap" => panic!("http guest trapped on purpose"),
            "/after" => {
                respond(out, 200, &[], b"done\n");
                if let Some(ms) = query.split('&').find_map(|kv| kv.strip_prefix("ms=")?.parse::<u64>().ok()) {
                    wasi::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
                }
                if query.split('&').any(|kv| kv == "spin") {
                    loop {
                        std::hint::spin_loop();
                    }
                }
                if query.split('&').any(|kv| kv == "trap") {
                    panic!("http guest trapped after its response");
                }
            }
            "/outbound" => {
                let authority = query.strip_prefix("to=").unwrap_or("example.com");
                respond(out, 200, &[], outbound(authority).as_bytes())
            }
            _ => match path.strip_prefix("/status/").and_then(|code| code.parse::<u16>().ok()) {
                Some(code) => respond(out, code, &[], format!("status {code}").as_bytes()),
                None => respond(out, 404, &[("x-path", path_with_query.clone().into_bytes())], b"not found"),
            },
        }
    }
}
