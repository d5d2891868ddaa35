//! `wasi:http/proxy` components built with the plain `wasi` crate, served
//! under `/http/{name}/`, and instance reuse.

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
    let response = server.http.get(server.url("/http/web/big?bytes=5000000")).send().unwrap();
    assert_eq!(response.bytes().unwrap().len(), 5_000_000);

    let response = server.http.get(server.url("/http/web/status/418")).send().unwrap();
    assert_eq!((response.status().as_u16(), response.text().unwrap()), (418, "status 418".to_owned()));
    assert_eq!(server.http.get(server.url("/http/web/nothing-here")).send().unwrap().status(), 404);

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
    let text = server.http.get(server.url("/http/net/outbound?to=127.0.0.1:1")).send().unwrap().text().unwrap();
    assert!(text.contains("HttpRequestDenied"), "another port of the same host is refused: {text}");

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
