//! `wasi:http/proxy` components built with the plain `wasi` crate, served
//! under `/http/{name}/`, and instance reuse.

use std::io::{Read as _, Write as _};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

#[test]
fn a_wasi_http_component_gets_the_raw_request_and_answers_it() {
    let server = Server::start("http", &[]);
    let deployed = server.deploy_guest("web", "guest-http", Some("[task_queue]\nretries = 0\n"));
    assert_eq!(deployed["world"], "wasi:http/proxy");

    let response = server
        .http
        .put(server.url("/http/web/echo?a=1&b=two"))
        .header("x-test", "header value")
        .body("the body")
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["x-method"], "PUT");
    assert_eq!(headers["x-path"], "/echo?a=1&b=two", "path and query reach the guest");
    assert_eq!(headers["x-echo"], "header value");
    assert!(headers.contains_key("x-beamlet-task-id"));
    assert_eq!(response.text().unwrap(), "the body");

    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let response = server.http.post(server.url("/http/web/echo")).body(big.clone()).send().unwrap();
    assert_eq!(response.bytes().unwrap().as_ref(), big.as_slice(), "a large body goes in and comes back intact");
    // A guest that answers without reading the body: the rest is left
    // unread, so the connection cannot carry another request, and says so.
    let response = server.http.post(server.url("/http/web/hello")).body(vec![b'G'; 70_000]).send().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]));
    let response = server.http.get(server.url("/http/web/big?bytes=5000000")).send().unwrap();
    assert_eq!(response.bytes().unwrap().len(), 5_000_000);

    let response = server.http.get(server.url("/http/web/status/418")).send().unwrap();
    assert_eq!((response.status().as_u16(), response.text().unwrap()), (418, "status 418".to_owned()));
    assert_eq!(server.http.get(server.url("/http/web/nothing-here")).send().unwrap().status(), 404);
    // A status that is no final answer is the app's error; 204 has no body.
    let response = server.http.get(server.url("/http/web/status/101")).send().unwrap();
    assert_eq!(response.status(), 502);
    assert!(response.headers().contains_key("x-beamlet-task-id"), "{:?}", response.headers());
    let body: Value = response.json().unwrap();
    assert!(error_message(&body).contains("status 101"), "{body}");
    let response = server.http.get(server.url("/http/web/status/204")).send().unwrap();
    assert_eq!(response.status(), 204);
    assert!(!response.headers().contains_key("content-length"), "{:?}", response.headers());
    // The path reaches the guest as sent: escapes are the guest's to decode.
    let response = server.http.get(server.url("/http/web/a%3Fb/c%20d%2Fe?q=%3F")).send().unwrap();
    assert_eq!(response.headers()["x-path"], "/a%3Fb/c%20d%2Fe?q=%3F");

    let (hook, received) = receiver(0);
    let authority = hook.trim_start_matches("http://").trim_end_matches("/hook").to_owned();
    let outbound = format!("/http/web/outbound?to={authority}");
    let text = server.http.get(server.url(&outbound)).send().unwrap().text().unwrap();
    assert!(text.starts_with("denied") && text.contains("HttpRequestDenied"), "outbound HTTP is refused: {text}");
    assert!(received.lock().unwrap().is_empty(), "nothing left the sandbox");

    // An app that lists the host may reach it, and only it.
    let config = format!("[runtime]\nallowed_outbound_hosts = [\"{authority}\"]\n");
    server.deploy_guest("net", "guest-http", Some(&config));
    let text = server.http.get(server.url(&outbound.replace("/web/", "/net/"))).send().unwrap().text().unwrap();
    assert_eq!(text, "allowed: 200");
    assert_eq!(received.lock().unwrap().len(), 1, "the request reached the allowed host");
    // Marked as a guest's: a node it reaches refuses to let it manage apps.
    assert_eq!(received.lock().unwrap()[0].headers.get("x-beamlet-guest").map(String::as_str), Some("1"));
    let text = server.http.get(server.url("/http/net/outbound?to=127.0.0.1:1")).send().unwrap().text().unwrap();
    assert!(text.contains("HttpRequestDenied"), "another port of the same host is refused: {text}");
    // The app's retries (3 by default) re-run an idempotent request, never a POST.
    let response = server.http.get(server.url("/http/net/trap")).send().unwrap();
    let body: Value = response.json().unwrap();
    assert!(error_message(&body).starts_with("after 4 attempts: "), "{body}");
    let response = server.http.post(server.url("/http/net/trap")).body("abc").send().unwrap();
    let body: Value = response.json().unwrap();
    assert_eq!(error_code(&body), "GUEST_TRAP", "{body}");
    assert!(!error_message(&body).contains("attempts"), "run once: {body}");

    let response = server.http.get(server.url("/http/web/trap")).send().unwrap();
    assert_eq!(response.status(), 500);
    let body: Value = response.json().unwrap();
    assert_eq!(error_code(&body), "GUEST_TRAP");
    assert!(error_message(&body).contains("http guest trapped on purpose"), "{body}");
    assert_eq!(
        server.http.get(server.url("/http/web/status/200")).send().unwrap().status(),
        200,
        "the next request works"
    );

    // Each world answers only on its own routes.
    let (status, body) = server.invoke_json("web", "{}");
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body).contains("/http/web/"), "{body}");
    server.deploy_guest("hello", "hello", None);
    let response = server.http.get(server.url("/http/hello/")).send().unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(server.http.get(server.url("/http/nope/")).send().unwrap().status(), 404);
}

#[test]
fn request_and_response_bodies_stream_both_ways() {
    // Far more than the node would take as one input: the bodies must stream.
    let server = Server::start("stream", &["--max-input-size", "1Mi"]);
    server.deploy_guest("pipe", "guest-http", Some("[task_queue]\nretries = 0\n"));

    // 24 MiB of unknown length (chunked) in, the same bytes back as they pass.
    let sent: Vec<u8> = (0..24u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let (head, received) = chunked_exchange(&server, "/http/pipe/pipe", &sent);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "the body came back intact");

    // Full duplex: each line must come back before the next is sent, which
    // only works if neither body waits for its end.
    let mut socket = open_pipe(&server, "/http/pipe/pipe");
    let mut seen = Vec::new();
    for i in 0..5 {
        echo(&mut socket, &mut seen, &format!("ping {i}\n"));
    }
    socket.write_all(b"0\r\n\r\n").unwrap();
    socket.read_to_end(&mut seen).unwrap();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("0\r\n\r\n"), "the body ended cleanly: {text}");

    let response = server.http.get(server.url("/http/pipe/big?bytes=3000000")).send().unwrap();
    assert_eq!(response.bytes().unwrap().len(), 3_000_000, "a streamed response comes whole");

    // A guest that traps halfway through a streamed body: its status was
    // already sent, so the client sees the body break off, never a short
    // body that looks whole; the app goes on.
    let response = server.http.get(server.url("/http/pipe/partial")).send().unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().is_err(), "the broken body is reported as broken");
    let logs = server.http.get(server.url("/v1/apps/pipe/logs")).send().unwrap().text().unwrap();
    assert!(logs.contains("response cut short: guest trapped"), "the app's logs say why: {logs}");
    assert_eq!(server.http.get(server.url("/http/pipe/hello")).send().unwrap().text().unwrap(), "Hello, world!\n");

    // A malformed body fails the guest's read with the reason, not as a
    // connection that ended.
    let mut socket = connect(&server);
    socket
        .write_all(
            b"POST /http/pipe/echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n",
        )
        .unwrap();
    let mut seen = Vec::new();
    socket.read_to_end(&mut seen).unwrap();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 500") && text.contains("request body failed"), "{text}");

    // An upload that stalls cannot hold a worker past the task's timeout: the
    // guest's read fails at the deadline, the client's response breaks off,
    // and the worker serves the next request.
    server.deploy_guest("slow", "guest-http", Some("[runtime]\ntimeout = \"1s\"\n[task_queue]\nretries = 0\n"));
    let mut socket = connect(&server);
    socket
        .write_all(b"POST /http/slow/pipe HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        .unwrap();
    let mut seen = Vec::new();
    socket.read_to_end(&mut seen).unwrap();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200") && text.contains("first"), "{text}");
    assert!(!text.ends_with("0\r\n\r\n"), "the body did not end as if whole: {text}");
    assert_eq!(server.http.get(server.url("/http/slow/hello")).send().unwrap().text().unwrap(), "Hello, world!\n");

    // A client that stops reading a big response and then hangs up: the
    // guest waits on flow control, sending nothing, yet its run is
    // cancelled at once (not left to the task's timeout, longer than the
    // test client waits) and the only worker serves the next request.
    let config = "[runtime]\nworkers = 1\ntimeout = \"10m\"\n[task_queue]\nretries = 0\n";
    server.deploy_guest("held", "guest-http", Some(config));
    let mut socket = connect(&server);
    socket.write_all(b"GET /http/held/big?bytes=200000000 HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 4096];
        let n = socket.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed before the response head");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(seen.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&seen));
    // Not a timing check: time for the socket's buffers and the stream's
    // window to fill, so the guest is blocked on a write when the client goes.
    std::thread::sleep(std::time::Duration::from_secs(1));
    drop(socket);
    assert_eq!(server.http.get(server.url("/http/held/hello")).send().unwrap().text().unwrap(), "Hello, world!\n");
}

#[test]
fn a_redeploy_lets_a_streaming_request_finish_on_the_old_version() {
    let server = Server::start("drain-stream", &[]);
    let config = "[runtime]\nworkers = 1\n[task_queue]\nretries = 0\n";
    server.deploy_guest("pipe", "guest-http", Some(config));
    let mut socket = open_pipe(&server, "/http/pipe/pipe");
    let mut seen = Vec::new();
    echo(&mut socket, &mut seen, "before the redeploy\n");
    // The replica serving the request now drains: the rest of the body must
    // still reach it.
    server.deploy_guest("pipe", "guest-http", Some(config));
    echo(&mut socket, &mut seen, "after the redeploy\n");
    socket.write_all(b"0\r\n\r\n").unwrap();
    socket.read_to_end(&mut seen).unwrap();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("0\r\n\r\n"), "the body ended whole: {text}");
}

/// Starts a chunked POST to `path`, its body to be sent with [`echo`].
fn open_pipe(server: &Server, path: &str) -> std::net::TcpStream {
    let mut socket = connect(server);
    let head = format!("POST {path} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
    socket.write_all(head.as_bytes()).unwrap();
    socket
}

/// Sends `line` as one chunk and reads into `seen` until it has come back.
fn echo(socket: &mut std::net::TcpStream, seen: &mut Vec<u8>, line: &str) {
    socket.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes()).unwrap();
    while !String::from_utf8_lossy(seen).contains(line) {
        let mut buf = [0u8; 4096];
        let n = socket.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed before {line:?} came back: {}", String::from_utf8_lossy(seen));
        seen.extend_from_slice(&buf[..n]);
    }
}

fn connect(server: &Server) -> std::net::TcpStream {
    let socket = std::net::TcpStream::connect(server.url("").trim_start_matches("http://")).unwrap();
    // Not a timing check: a hung exchange fails the test instead of hanging it.
    socket.set_read_timeout(Some(std::time::Duration::from_secs(120))).unwrap();
    socket
}

/// POSTs `body` with chunked transfer encoding (a length the node cannot
/// know ahead) from one thread while reading the response on this one, so
/// a response that streams back before the upload ends is read as it comes.
/// Returns the response head and its decoded body.
fn chunked_exchange(server: &Server, path: &str, body: &[u8]) -> (String, Vec<u8>) {
    let mut socket = connect(server);
    let mut writer = socket.try_clone().unwrap();
    let request = format!("POST {path} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
    let body = body.to_vec();
    let upload = std::thread::spawn(move || {
        writer.write_all(request.as_bytes()).unwrap();
        for chunk in body.chunks(100_000) {
            writer.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).unwrap();
            writer.write_all(chunk).unwrap();
            writer.write_all(b"\r\n").unwrap();
        }
        writer.write_all(b"0\r\n\r\n").unwrap();
    });
    let mut raw = Vec::new();
    socket.read_to_end(&mut raw).unwrap();
    upload.join().unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    let (mut rest, mut decoded) = (&raw[split..], Vec::new());
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16).unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            break;
        }
        decoded.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
    (head, decoded)
}

#[test]
fn instances_are_reused_per_worker_unless_per_task() {
    let server = Server::start("instances", &[]);
    server.deploy_guest("warm", "guest-trap", None);
    server.deploy_guest("fresh", "guest-trap", Some("[runtime]\ninstance = \"per-task\"\n"));
    let counters = |app: &str| -> Vec<u64> {
        (0..3).map(|_| server.invoke_json(app, r#"{"mode":"counter"}"#).1["counter"].as_u64().unwrap()).collect()
    };
    assert_eq!(counters("warm"), vec![1, 2, 3], "one instance served all three");
    assert_eq!(counters("fresh"), vec![1, 1, 1], "a fresh instance for every task");
}

#[test]
fn the_python_example_serves_requests_from_a_warm_instance() {
    let server = Server::start("python", &[]);
    let response = server.deploy("py", &std::fs::read(python_http()).unwrap(), None);
    assert_eq!(response.status(), 201, "{}", response.text().unwrap());

    let served: Vec<u64> = (0..3)
        .map(|_| {
            let response = server.http.get(server.url("/http/py/hello")).send().unwrap();
            assert_eq!(response.status(), 200);
            let served = response.headers()["x-served"].to_str().unwrap().parse().unwrap();
            assert_eq!(response.text().unwrap(), "Hello from Python!\n");
            served
        })
        .collect();
    assert_eq!(served, vec![1, 2, 3], "one warm instance served every request");

    let body = "py ".repeat(100_000);
    let response = server.http.post(server.url("/http/py/echo")).body(body.clone()).send().unwrap();
    assert_eq!(response.text().unwrap(), body);
    assert_eq!(server.http.get(server.url("/http/py/missing")).send().unwrap().status(), 404);
}

#[test]
fn concurrent_load_gets_every_answer_right() {
    let server = Server::start("load", &[]);
    server.deploy_guest("web", "guest-http", Some("[runtime]\nworkers = 4\n"));
    server.deploy_guest("hello", "hello", Some("[runtime]\nworkers = 2\n"));
    let failures: Vec<String> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..16)
            .map(|client| {
                let server = &server;
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    for i in 0..60 {
                        let body = format!("client {client} request {i}");
                        let response = server.http.post(server.url("/http/web/echo")).body(body.clone()).send();
                        match response.map(|r| (r.status().as_u16(), r.text().unwrap_or_default())) {
                            Ok((200, text)) if text == body => {}
                            other => failures.push(format!("http {body}: {other:?}")),
                        }
                        let name = format!("c{client}r{i}");
                        let (status, answer) = server.invoke_json("hello", &format!(r#"{{"name":"{name}"}}"#));
                        if status != 200 || answer["message"] != format!("Hello, {name}!") {
                            failures.push(format!("invoke {name}: {status} {answer}"));
                        }
                    }
                    failures
                })
            })
            .collect();
        clients.into_iter().flat_map(|client| client.join().unwrap()).collect()
    });
    assert!(failures.is_empty(), "{} failures, first: {:?}", failures.len(), failures.first());
    let status = server.status("web");
    assert_eq!(status["replicas"][0]["restarts"], 0, "no replica died under load");
}

#[test]
fn a_request_head_over_128_kib_is_refused_with_431() {
    let server = Server::start("http-head-limit", &[]);
    let status_of = |header_bytes: usize| {
        use std::io::{Read, Write};
        let mut socket = connect(&server);
        let request = format!(
            "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\nconnection: close\r\n\r\n",
            "a".repeat(header_bytes)
        );
        // The node may answer and close before it has read it all.
        let _ = socket.write_all(request.as_bytes());
        let mut answer = Vec::new();
        let _ = socket.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_owned()
    };
    assert_eq!(status_of(120 * 1024), "HTTP/1.1 200 OK");
    assert_eq!(status_of(130 * 1024), "HTTP/1.1 431 Request Header Fields Too Large");
}

#[test]
fn a_whole_response_goes_out_while_the_guest_works_on_after_it() {
    let server = Server::start("http-after", &[]);
    server.deploy_guest("web", "guest-http", Some("[runtime]\nworkers = 3\ntimeout = \"120s\"\n"));
    // A generous limit: the guest works on for two minutes after its response.
    let client = http_client().timeout(Duration::from_secs(60)).build().unwrap();
    let response = client.get(server.url("/http/web/after?ms=120000")).send().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().unwrap(), "done\n");
    // Nor while it spins without calling the host.
    let response = client.get(server.url("/http/web/after?spin")).send().unwrap();
    assert_eq!((response.status().as_u16(), response.text().unwrap()), (200, "done\n".to_owned()));
    // A trap after it takes nothing back, at once or later, and the request is not run again.
    let traps = || {
        let logs = server.get("/v1/apps/web/logs");
        let lines = logs["lines"].as_array().cloned().unwrap_or_default();
        lines.iter().filter(|line| line.as_str().is_some_and(|l| l.contains("trapped after its response"))).count()
    };
    for (n, path) in [(1, "/http/web/after?ms=10&trap"), (2, "/http/web/after?trap")] {
        let response = client.get(server.url(path)).send().unwrap();
        assert_eq!((response.status().as_u16(), response.text().unwrap()), (200, "done\n".to_owned()), "{path}");
        wait_for("the trap in the app's log", Duration::from_secs(60), || (traps() >= n).then_some(()));
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(traps(), n, "{path} runs once: {}", server.get("/v1/apps/web/logs"));
    }
}
