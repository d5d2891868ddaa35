//! End-to-end: real guest components, a real `beamlet serve`, real replica
//! processes, HTTP on 127.0.0.1. Nothing here checks speed.

mod autoscale;
mod cluster;
mod gpu;
mod http;
mod queue;
#[path = "../redis_server.rs"]
mod redis_server;
mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::*;

const LONG: Duration = Duration::from_secs(60);

fn cli(server: &Server, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_beamlet")).args(args).env("BEAMLET_SERVER", &server.base).output().unwrap()
}

#[test]
fn hello_deploys_and_answers_over_http_and_cli() {
    let server = Server::start("hello", &[]);
    assert_eq!(server.http.get(server.url("/healthz")).send().unwrap().status(), 200);

    let wasm = wasm("hello");
    let out = cli(&server, &["deploy", wasm.to_str().unwrap(), "--name", "hello"]);
    assert!(out.status.success(), "deploy failed: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("deployed hello version 1"), "{printed}");
    assert!(printed.contains("/v1/apps/hello/invoke"), "prints how to call it: {printed}");

    let response = server.invoke("hello", r#"{"name": "Ada"}"#);
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-beamlet-task-id"));
    let body: Value = response.json().unwrap();
    assert_eq!(body, serde_json::json!({ "message": "Hello, Ada!" }));

    let out = cli(&server, &["invoke", "hello", "--data", r#"{"name":"Grace"}"#]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Hello, Grace!"));

    let apps = server.get("/v1/apps");
    assert_eq!(apps["apps"][0]["name"], "hello");
    let status = server.status("hello");
    assert_eq!(status["version"], 1);
    assert_eq!(status["world"], "beamlet:function/function");
    assert_eq!(status["replicas"][0]["state"], "ready");
    assert_eq!(status["replicas"][0]["workers"], 1);
    assert!(status["replicas"][0]["tasks_done"].as_u64().unwrap() >= 2);

    let out = cli(&server, &["apps"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello"));
    let out = cli(&server, &["status", "hello"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("hello version 1 (beamlet:function/function"), "{text}");
    assert!(text.contains("hello-v1-r0") && text.contains(" ready "), "{text}");
    let out = cli(&server, &["status", "hello", "--json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"version\": 1"));
    let out = cli(&server, &["logs", "hello"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Ada"),
        "guest stdout is captured: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The same handler through the task queue.
    let response = server.http.post(server.url("/v1/apps/hello/tasks")).body(r#"{"name":"Lin"}"#).send().unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().unwrap()["task_id"].as_str().unwrap().to_owned();
    let record = server.get(&format!("/v1/tasks/{id}?wait=30s"));
    assert_eq!(record["status"], "COMPLETE", "{record}");
    assert_eq!(record["attempts"], 1);
    let result: Value = server.http.get(server.url(&format!("/v1/tasks/{id}/result"))).send().unwrap().json().unwrap();
    assert_eq!(result["message"], "Hello, Lin!");
    // Or wait for the output itself.
    let response = server.http.post(server.url("/v1/apps/hello/tasks")).body(r#"{"name":"Kim"}"#).send().unwrap();
    let id = response.json::<Value>().unwrap()["task_id"].as_str().unwrap().to_owned();
    let waited = server.http.get(server.url(&format!("/v1/tasks/{id}/result?wait=30s"))).send().unwrap();
    assert_eq!(waited.json::<Value>().unwrap()["message"], "Hello, Kim!");

    // A query parameter an endpoint does not take is refused, not ignored.
    let response =
        server.http.post(server.url("/v1/apps/hello/invoke?callback_url=http://127.0.0.1:9/")).send().unwrap();
    let (status, body) = (response.status().as_u16(), response.json::<Value>().unwrap());
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body).contains("/tasks"), "says where it belongs: {body}");
    let response = server.http.get(server.url(&format!("/v1/tasks/{id}?wiat=30s"))).send().unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().unwrap().contains("wiat"));

    // Names and ids that would reach another endpoint are refused by the
    // CLI itself (`hello#x` read as `hello` deleted the app).
    for args in
        [&["delete", "hello#x"][..], &["deploy", wasm.to_str().unwrap(), "--name", "hello?v=2"], &["status", ".."]]
    {
        let out = cli(&server, args);
        assert!(!out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("is not valid"), "{args:?}: {out:?}");
    }
    let out = cli(&server, &["task", "cancel", "../apps/hello"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a task id"), "{out:?}");
    assert_eq!(server.status("hello")["version"], 1, "untouched");

    // A new deploy is a new version; one without the config the last had
    // is warned about; delete removes the app.
    let body = server.deploy_guest("hello", "hello", Some("[runtime]\nworkers = 2\n"));
    assert_eq!((body["version"].as_u64(), body["warnings"].as_array().map(Vec::len)), (Some(2), Some(0)), "{body}");
    let out = cli(&server, &["deploy", wasm.to_str().unwrap(), "--name", "hello"]);
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && warned.contains("version 3 runs with the default config"), "{out:?}");
    assert_eq!(server.invoke_json("hello", r#"{"name":"Ada"}"#).0, 200);
    let out = cli(&server, &["delete", "hello"]);
    assert!(out.status.success());
    let (status, body) = server.invoke_json("hello", "{}");
    assert_eq!((status, error_code(&body)), (404, "UNKNOWN_APP"));
}

#[test]
fn bad_uploads_and_requests_get_clear_errors() {
    let server = Server::start("bad", &["--max-component-size", "8Mi", "--max-input-size", "1Mi"]);
    let hello = std::fs::read(wasm("hello")).unwrap();
    let deploy_error = |name: &str, wasm: &[u8], config: Option<&str>| {
        let response = server.deploy(name, wasm, config);
        let status = response.status().as_u16();
        let body: Value = response.json().unwrap();
        (status, body)
    };

    // An error answered before the request's body was read says the
    // connection closes, so a pooled client does not reuse it.
    let addr = server.url("").trim_start_matches("http://").trim_end_matches('/').to_owned();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = "x".repeat(100_000);
    let request =
        format!("POST /v1/apps/nope/tasks HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut answer);
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");

    let (status, body) = deploy_error("junk", b"this is not wasm at all", None);
    assert_eq!((status, error_code(&body)), (400, "NOT_WASM"), "{body}");

    let (status, body) = deploy_error("core", b"\0asm\x01\0\0\0", None);
    assert_eq!((status, error_code(&body)), (400, "NOT_A_COMPONENT"), "{body}");
    assert!(error_message(&body).contains("wasm32-wasip2"));

    let (status, body) = deploy_error("cmd", &std::fs::read(wasm("guest-command")).unwrap(), None);
    assert_eq!((status, error_code(&body)), (400, "WRONG_WORLD"), "{body}");
    assert!(error_message(&body).contains("beamlet:function/function"));

    let (status, body) = deploy_error("cfg", &hello, Some("[runtime]\nwrkers = 2\n"));
    assert_eq!((status, error_code(&body)), (400, "BAD_CONFIG"), "{body}");
    assert!(error_message(&body).contains("wrkers"), "names the key: {body}");

    let (status, body) = deploy_error("cfg", &hello, Some("[runtime]\nmemory = \"4GB\"\n"));
    assert_eq!((status, error_code(&body)), (400, "BAD_CONFIG"), "{body}");
    assert!(error_message(&body).contains("memory"), "names the key: {body}");

    let (status, body) = deploy_error("gpu", &hello, Some("[runtime]\ngpu_memory = \"1Gi\"\n"));
    assert_eq!((status, error_code(&body)), (400, "BAD_CONFIG"), "{body}");
    assert!(error_message(&body).contains("gpu_memory") && error_message(&body).contains("needs a GPU"), "{body}");

    let (status, body) = deploy_error("net", &hello, Some("[runtime]\nallowed_outbound_hosts = [\"https://x/\"]\n"));
    assert_eq!((status, error_code(&body)), (400, "BAD_CONFIG"), "{body}");
    assert!(error_message(&body).contains("allowed_outbound_hosts"), "{body}");

    let (status, body) = deploy_error("Bad_Name", &hello, None);
    assert_eq!((status, error_code(&body)), (400, "BAD_NAME"), "{body}");

    let (status, body) = deploy_error("huge", &vec![0u8; 9 * 1024 * 1024], None);
    assert_eq!((status, error_code(&body)), (413, "PAYLOAD_TOO_LARGE"), "{body}");
    assert!(error_message(&body).contains("--max-component-size"), "says what sets the limit: {body}");

    let response = server.http.put(server.url("/v1/apps/raw")).body(hello.clone()).send().unwrap();
    assert_eq!(response.status(), 400, "deploy without multipart is refused");
    let twice = reqwest::blocking::multipart::Form::new()
        .part("component", reqwest::blocking::multipart::Part::bytes(hello.clone()).file_name("a.wasm"))
        .part("component", reqwest::blocking::multipart::Part::bytes(hello.clone()).file_name("b.wasm"));
    let response = server.http.put(server.url("/v1/apps/twice")).multipart(twice).send().unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().unwrap();
    assert!(error_message(&body).contains("two `component` parts"), "{body}");
    let swapped = reqwest::blocking::multipart::Form::new()
        .part("component", reqwest::blocking::multipart::Part::bytes(hello.clone()).file_name("a.wasm"))
        .part("config", reqwest::blocking::multipart::Part::bytes(hello.clone()).file_name("a.wasm"));
    let response = server.http.put(server.url("/v1/apps/swapped")).multipart(swapped).send().unwrap();
    let body: Value = response.json().unwrap();
    assert_eq!(error_code(&body), "BAD_CONFIG", "{body}");
    assert!(error_message(&body).contains("the config part is a WebAssembly file"), "{body}");
    let comments = format!("[runtime]\n{}\n", "#".repeat(100_000));
    let huge = reqwest::blocking::multipart::Form::new()
        .part("component", reqwest::blocking::multipart::Part::bytes(hello.clone()).file_name("a.wasm"))
        .text("config", comments);
    let response = server.http.put(server.url("/v1/apps/huge-config")).multipart(huge).send().unwrap();
    let body: Value = response.json().unwrap();
    assert_eq!(error_code(&body), "PAYLOAD_TOO_LARGE", "{body}");
    assert!(error_message(&body).contains("more than the 64Ki an app's config may be"), "{body}");
    let response = server
        .http
        .put(server.url("/v1/apps/unbounded"))
        .header("content-type", "multipart/form-data")
        .body("abc")
        .send()
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(error_message(&response.json().unwrap()).contains("has no boundary="));

    let (status, body) = server.invoke_json("nope", "{}");
    assert_eq!((status, error_code(&body)), (404, "UNKNOWN_APP"), "{body}");
    let body = server.get("/v1/tasks/no-such-task");
    assert_eq!(error_code(&body), "UNKNOWN_TASK");
    // Errors the routing itself answers have the API's JSON shape too.
    let response = server.http.post(server.url("/v1/apps/hello")).send().unwrap();
    assert_eq!(response.status(), 405);
    assert!(response.headers().contains_key("allow"));
    assert_eq!(error_code(&response.json().unwrap()), "METHOD_NOT_ALLOWED");
    for limit in ["-1", "0", "lots", "10001"] {
        let response = server.http.get(server.url(&format!("/v1/apps/hello/tasks?limit={limit}"))).send().unwrap();
        assert_eq!(response.status(), 400);
        let body: Value = response.json().unwrap();
        assert!(error_message(&body).contains("is not a number of tasks; ask for 1 to 10000"), "{body}");
    }

    server.deploy_guest("hello", "hello", None);
    let response = server.invoke("hello", &"x".repeat(2 * 1024 * 1024));
    assert_eq!(response.status(), 413);
    let (status, body) = server.invoke_json("hello", "not json");
    assert_eq!((status, error_code(&body)), (400, "BAD_INPUT"), "{body}");

    // None of that disturbed the node.
    let (status, body) = server.invoke_json("hello", r#"{"name":"Ada"}"#);
    assert_eq!((status, &body["message"]), (200, &Value::from("Hello, Ada!")));
    assert!(server.get("/v1/apps")["apps"].as_array().unwrap().len() == 1, "failed deploys leave no app behind");
}

#[test]
fn traps_timeouts_and_memory_exhaustion_fail_only_their_task() {
    let server = Server::start("faults", &[]);
    server.deploy_guest("trap", "guest-trap", Some("[task_queue]\nretries = 0\n"));
    server.deploy_guest("spin", "guest-spin", Some("[runtime]\ntimeout = \"1s\"\n[task_queue]\nretries = 0\n"));
    server.deploy_guest("hog", "guest-hog", Some("[runtime]\nmemory = \"48Mi\"\n[task_queue]\nretries = 0\n"));
    server.deploy_guest("hello", "hello", None);

    // A warm instance keeps its state between tasks...
    assert_eq!(server.invoke_json("trap", r#"{"mode":"counter"}"#).1["counter"], 1);
    assert_eq!(server.invoke_json("trap", r#"{"mode":"counter"}"#).1["counter"], 2);
    let pid = server.ready_pids("trap");

    let (status, body) = server.invoke_json("trap", r#"{"mode":"panic"}"#);
    assert_eq!((status, error_code(&body)), (500, "GUEST_TRAP"), "{body}");
    assert!(error_message(&body).contains("guest panicked on purpose"), "the panic message reaches the caller: {body}");
    // ...and a trap replaces the instance (fresh state) but not the process.
    assert_eq!(server.invoke_json("trap", r#"{"mode":"counter"}"#).1["counter"], 1);
    assert_eq!(server.ready_pids("trap"), pid);

    let (status, body) = server.invoke_json("trap", r#"{"mode":"unreachable"}"#);
    assert_eq!((status, error_code(&body)), (500, "GUEST_TRAP"), "{body}");
    assert!(error_message(&body).contains("unreachable"), "{body}");
    let (status, body) = server.invoke_json("trap", r#"{"mode":"error"}"#);
    assert_eq!((status, error_code(&body)), (500, "GUEST_ERROR"), "{body}");
    assert!(error_message(&body).contains("handler said no"));
    let (status, body) = server.invoke_json("trap", r#"{"mode":"bad"}"#);
    assert_eq!((status, error_code(&body)), (400, "BAD_INPUT"), "{body}");
    assert_eq!(server.invoke_json("trap", r#"{"mode":"ok"}"#).0, 200);

    let (status, body) = server.invoke_json("spin", "{}");
    assert_eq!((status, error_code(&body)), (504, "TIMEOUT"), "{body}");
    let (status, body) = server.invoke_json("spin", "{}");
    assert_eq!((status, error_code(&body)), (504, "TIMEOUT"), "the worker came back for the next task: {body}");

    let (status, body) = server.invoke_json("hog", r#"{"mib": 4}"#);
    assert_eq!((status, &body["allocated_mib"]), (200, &Value::from(4)), "{body}");
    let (status, body) = server.invoke_json("hog", r#"{"mib": 400}"#);
    assert_eq!((status, error_code(&body)), (500, "OUT_OF_MEMORY"), "{body}");
    assert!(error_message(&body).contains("48Mi"), "says which limit: {body}");
    assert_eq!(server.invoke_json("hog", r#"{"mib": 4}"#).0, 200);

    let response = server.http.post(server.url("/v1/apps/spin/tasks")).body("{}").send().unwrap();
    let id = response.json::<Value>().unwrap()["task_id"].as_str().unwrap().to_owned();
    let task = server.get(&format!("/v1/tasks/{id}?wait=60s"));
    assert_eq!((task["status"].as_str(), task["attempts"].as_u64()), (Some("TIMEOUT"), Some(1)), "{task}");

    assert_eq!(server.invoke_json("hello", r#"{"name":"Ada"}"#).0, 200, "other apps keep serving");

    // Between tasks the replica's epoch thread sleeps (it ticked every 5 ms
    // before, ~200 wake-ups a second per idle replica).
    let pid = server.ready_pids("spin")[0];
    let epoch_wakes = || -> u64 {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        let epoch = tasks
            .flatten()
            .map(|task| task.path())
            .find(|task| std::fs::read_to_string(task.join("comm")).is_ok_and(|comm| comm.trim() == "epoch"));
        let status = std::fs::read_to_string(epoch.expect("an epoch thread").join("status")).unwrap();
        let line = status.lines().find(|line| line.starts_with("voluntary_ctxt_switches:")).unwrap();
        line.split_whitespace().last().unwrap().parse().unwrap()
    };
    let before = epoch_wakes();
    std::thread::sleep(Duration::from_secs(1));
    let woke = epoch_wakes() - before;
    assert!(woke < 20, "an idle replica's epoch thread woke {woke} times in a second");
}

#[test]
fn a_guest_waiting_in_a_host_call_is_stopped_by_its_timeout_and_by_cancel() {
    let server = Server::start("blocked", &[]);
    server.deploy_guest("spin", "guest-spin", Some("[runtime]\ntimeout = \"1s\"\n[task_queue]\nretries = 0\n"));
    let sleep = r#"{"sleep": true}"#;

    // The guest sleeps for an hour inside wasi poll: no wasm code runs for
    // the epoch deadline to stop, yet the task ends at its timeout...
    let (status, body) = server.invoke_json("spin", sleep);
    assert_eq!((status, error_code(&body)), (504, "TIMEOUT"), "{body}");
    let pid = server.ready_pids("spin");
    // ...and the only worker is free for the next one, in the same process.
    let (status, body) = server.invoke_json("spin", sleep);
    assert_eq!((status, error_code(&body)), (504, "TIMEOUT"), "the worker came back: {body}");
    assert_eq!(server.ready_pids("spin"), pid);

    // A cancel reaches it too.
    let submit = |input: &str| {
        let response = server.http.post(server.url("/v1/apps/spin/tasks")).body(input.to_owned()).send().unwrap();
        response.json::<Value>().unwrap()["task_id"].as_str().unwrap().to_owned()
    };
    let status_of = |id: &str| server.get(&format!("/v1/tasks/{id}"))["status"].as_str().unwrap().to_owned();
    let sleeper = submit(sleep);
    wait_for("the sleeping task to run", LONG, || (status_of(&sleeper) == "RUNNING").then_some(()));
    let response = server.http.delete(server.url(&format!("/v1/tasks/{sleeper}"))).send().unwrap();
    assert_eq!(response.status(), 200);
    let next = submit(sleep);
    wait_for("the next task to run on the freed worker", LONG, || (status_of(&next) == "RUNNING").then_some(()));
    let task = server.get(&format!("/v1/tasks/{next}?wait=60s"));
    assert_eq!(task["status"], "TIMEOUT", "{task}");
    assert_eq!(server.ready_pids("spin"), pid);
}

#[test]
fn an_app_whose_init_fails_answers_with_the_reason() {
    let server = Server::start("badinit", &[]);
    server.deploy_guest("badinit", "guest-badinit", None);
    let (status, body) = server.invoke_json("badinit", "{}");
    assert_eq!((status, error_code(&body)), (503, "START_FAILED"), "{body}");
    assert!(error_message(&body).contains("model file missing"), "says why: {body}");
    let status = server.status("badinit");
    let last_error = status["replicas"][0]["last_error"].as_str().unwrap_or_default();
    assert!(last_error.contains("model file missing"), "{status}");
    // The app list tells a replica that fails to start from one that serves.
    wait_for("the replica listed as failing", LONG, || {
        let apps = server.get("/v1/apps");
        let app = apps["apps"].as_array()?.iter().find(|app| app["name"] == "badinit")?.clone();
        (app["failing_replicas"] == 1 && app["replicas"] == 0).then_some(())
    });
    // A task submitted to the queue waits instead (up to its ttl), through
    // more failed starts; a fixed version runs it.
    let failed_starts = || server.status("badinit")["replicas"][0]["failed_starts"].as_u64();
    let before = failed_starts().unwrap_or_default();
    let id = submit(&server, "badinit", r#"{"ms": 1}"#);
    wait_for("another failed start", LONG, || failed_starts().is_some_and(|n| n > before).then_some(()));
    assert_eq!(server.get(&format!("/v1/tasks/{id}"))["status"], "PENDING");
    server.deploy_guest("badinit", "sleep", None);
    let record = server.get(&format!("/v1/tasks/{id}?wait=60s"));
    assert_eq!((record["status"].as_str(), record["attempts"].as_u64()), (Some("COMPLETE"), Some(1)), "{record}");

    // An init longer than the app's timeout says which key limits it.
    server.deploy_guest("slow", "guest-slowstart", Some("[runtime]\nworkers = 2\ntimeout = \"1s\"\n"));
    let (status, body) = server.invoke_json("slow", "{}");
    assert_eq!((status, error_code(&body)), (503, "START_FAILED"), "{body}");
    assert!(error_message(&body).contains("[runtime] timeout = 1s"), "says what to raise: {body}");
}

#[test]
fn a_call_made_once_a_deploy_answered_runs_the_new_version() {
    let server = Server::start("redeploy", &[]);
    // Two deploys at a time (the first version's replica still starting
    // when the second's deploy answers); the call right after runs on the
    // second (sleep names the replica that ran it, which names its version).
    for round in 0..8 {
        server.deploy_guest("turns", "sleep", None);
        let version = server.deploy_guest("turns", "sleep", None)["version"].as_u64().unwrap();
        let (status, body) = server.invoke_json("turns", r#"{"ms":0}"#);
        assert_eq!(status, 200, "{body}");
        let replica = body["replica"].as_str().unwrap_or_default();
        assert!(
            replica.starts_with(&format!("turns-v{version}-")),
            "round {round}: version {version} should run it: {body}"
        );
    }
}

#[test]
fn five_workers_run_five_tasks_at_once() {
    let server = Server::start("workers", &[]);
    let config =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/sleep/beamlet.toml")).unwrap();
    server.deploy_guest("sleep", "sleep", Some(&config));
    server.wait_status("sleep", "the replica to be ready", LONG, |s| ready_pids(s).len() == 1);
    let results: Vec<Value> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..5).map(|_| scope.spawn(|| server.invoke_json("sleep", r#"{"ms": 1500}"#))).collect();
        calls
            .into_iter()
            .map(|call| {
                let (status, body) = call.join().unwrap();
                assert_eq!(status, 200, "{body}");
                body
            })
            .collect()
    });
    let workers: BTreeSet<u64> = results.iter().map(|r| r["worker"].as_u64().unwrap()).collect();
    assert_eq!(workers, (0..5).collect(), "five distinct workers");
    let replicas: BTreeSet<&str> = results.iter().map(|r| r["replica"].as_str().unwrap()).collect();
    assert_eq!(replicas.len(), 1, "on one replica");
    let latest_start = results.iter().map(|r| r["started_at_ms"].as_u64().unwrap()).max().unwrap();
    let earliest_end = results.iter().map(|r| r["ended_at_ms"].as_u64().unwrap()).min().unwrap();
    assert!(latest_start < earliest_end, "all five ran at the same time: {results:?}");
    let log = server.log();
    for worker in 0..5 {
        assert!(
            log.contains(&format!("worker={worker}")) && log.contains("worker started"),
            "worker {worker} start is logged"
        );
    }
}

#[test]
fn a_killed_replica_is_replaced_and_its_task_retried() {
    let server = Server::start("crash", &[]);
    server.deploy_guest("sleep", "sleep", Some("[task_queue]\nretries = 2\n"));
    let pid = server.wait_status("sleep", "a ready replica", LONG, |s| ready_pids(s).len() == 1);
    let pid = ready_pids(&pid)[0];
    // Short tasks: the replica is then sent one more task than it has workers.
    for _ in 0..3 {
        assert_eq!(server.invoke_json("sleep", r#"{"ms": 0}"#).0, 200);
    }

    let submit = |input: &str| {
        let response = server.http.post(server.url("/v1/apps/sleep/tasks")).body(input.to_owned()).send().unwrap();
        response.json::<Value>().unwrap()["task_id"].as_str().unwrap().to_owned()
    };
    let running = |id: &str| (server.get(&format!("/v1/tasks/{id}"))["status"] == "RUNNING").then_some(());
    let id = submit(r#"{"ms": 3000}"#);
    wait_for("the task to run", LONG, || running(&id));
    let waiting = submit(r#"{"ms": 0}"#);
    wait_for("the next task to be sent to the busy replica", LONG, || running(&waiting));
    kill9(pid);

    let record = server.get(&format!("/v1/tasks/{id}?wait=60s"));
    assert_eq!(record["status"], "COMPLETE", "the task was retried on the new replica: {record}");
    assert_eq!(record["attempts"], 2);
    let record = server.get(&format!("/v1/tasks/{waiting}?wait=60s"));
    assert_eq!(record["status"], "COMPLETE", "{record}");
    assert_eq!(record["attempts"], 1, "a task that had not started on the lost replica spent no attempt: {record}");
    let status = server.status("sleep");
    let pids = ready_pids(&status);
    assert_eq!(pids.len(), 1);
    assert_ne!(pids[0], pid, "a new process replaced the killed one");
    assert_eq!(status["replicas"][0]["restarts"], 1);
    assert_eq!(server.invoke_json("sleep", r#"{"ms": 1}"#).0, 200);
}

#[test]
fn a_replica_restarted_after_a_crash_is_not_busy_with_its_lost_tasks() {
    let server = Server::start("crash-busy", &[]);
    let ids = two_running_sleeps(&server, 60000);
    kill9(ready_pids(&server.status("sleep"))[0]);
    for id in &ids {
        assert_eq!(server.get(&format!("/v1/tasks/{id}?wait=60s"))["status"], "FAILED");
    }
    // Its busy count drives scale-down and keep_warm: it must not keep the lost tasks.
    server.wait_status("sleep", "the new replica, idle", LONG, |s| {
        s["replicas"][0]["state"] == "ready" && s["replicas"][0]["busy"] == 0
    });
}

#[test]
fn a_hung_replica_is_killed_and_its_task_retried() {
    let server = Server::start("hung", &[]);
    server.deploy_guest("sleep", "sleep", Some("[runtime]\ntimeout = \"3s\"\n[task_queue]\nretries = 1\n"));
    let submit = server.http.post(server.url("/v1/apps/sleep/tasks")).body(r#"{"ms": 1000}"#).send().unwrap();
    let id = submit.json::<Value>().unwrap()["task_id"].as_str().unwrap().to_owned();
    wait_running(&server, &id);
    let pid = ready_pids(&server.status("sleep"))[0];
    // Stopped, the replica can neither finish the task nor stop it at its
    // timeout: the node must notice on its own.
    // SAFETY: sending a signal has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);

    let record = server.get(&format!("/v1/tasks/{id}?wait=90s"));
    assert_eq!(record["status"], "COMPLETE", "retried on a new replica: {record}");
    assert_eq!(record["attempts"], 2, "{record}");
    wait_for("the hung replica to be killed", LONG, || (!alive(pid)).then_some(()));
    let status = server.status("sleep");
    assert!(status["replicas"][0]["last_error"].as_str().unwrap_or_default().contains("hung"), "{status}");
}

#[test]
fn a_node_frozen_past_its_runs_timeouts_reads_their_answers_instead_of_killing_its_replica() {
    let server = Server::start("frozen-node", &[]);
    server.deploy_guest("sleep", "sleep", Some("[runtime]\ntimeout = \"1s\"\n[task_queue]\nretries = 1\n"));
    let id = submit(&server, "sleep", r#"{"ms": 300}"#);
    wait_running(&server, &id);
    let pid = ready_pids(&server.status("sleep"))[0];
    // The node, not its replica, stops for longer than the timeout and the
    // hung-replica margin after it: the answer waits in the replica's socket.
    let node = server.pid();
    // SAFETY: sending a signal has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(node as i32, libc::SIGSTOP) }, 0);
    std::thread::sleep(Duration::from_secs(13));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(node as i32, libc::SIGCONT) }, 0);
    let record = server.get(&format!("/v1/tasks/{id}?wait=60s"));
    assert_eq!((record["status"].as_str(), record["attempts"].as_u64()), (Some("COMPLETE"), Some(1)), "{record}");
    assert_eq!(ready_pids(&server.status("sleep")), vec![pid], "the replica was not taken for hung");
    assert!(!server.log().contains("hung"), "{}", server.log());
}

#[test]
fn a_task_waiting_for_a_worker_to_rebuild_its_instance_spends_no_attempt_when_the_replica_dies() {
    let server = Server::start("rebuild", &[]);
    let config = "[runtime]\nworkers = 1\ntimeout = \"30s\"\n[task_queue]\nretries = 0\n";
    server.deploy_guest("slow", "guest-slowstart", Some(config));
    let status = server.wait_status("slow", "a ready replica", LONG, |s| ready_pids(s).len() == 1);
    let pid = ready_pids(&status)[0];
    // The trap ends the instance; the only worker spends 3 s in the next `init`.
    let (status, body) = server.invoke_json("slow", r#"{"trap": true}"#);
    assert_eq!((status, error_code(&body)), (500, "GUEST_TRAP"), "{body}");
    let response = server.http.post(server.url("/v1/apps/slow/tasks")).body("{}").send().unwrap();
    let waiting = response.json::<Value>().unwrap()["task_id"].as_str().unwrap().to_owned();
    let sent = |id: &str| (server.get(&format!("/v1/tasks/{id}"))["status"] == "RUNNING").then_some(());
    wait_for("the task to be sent to the replica", LONG, || sent(&waiting));
    kill9(pid);

    let record = server.get(&format!("/v1/tasks/{waiting}?wait=60s"));
    assert_eq!(
        record["status"], "COMPLETE",
        "it never started on the lost replica, so it was not its last try: {record}"
    );
    assert_eq!(record["attempts"], 1, "{record}");
}

#[test]
fn replicas_start_from_the_running_binary_even_after_its_file_is_replaced() {
    let data_dir = temp_dir("upgrade");
    let exe = data_dir.join("beamlet");
    let built = std::path::Path::new(env!("CARGO_BIN_EXE_beamlet"));
    std::fs::hard_link(built, &exe).or_else(|_| std::fs::copy(built, &exe).map(drop)).unwrap();
    let server = Server::start_from(&exe, data_dir.clone(), &[]);
    // An upgrade in place: a new file under the same name (here one that
    // could never be a replica).
    let replacement = data_dir.join("beamlet.new");
    std::fs::write(&replacement, "#!/bin/sh\nexit 7\n").unwrap();
    std::fs::set_permissions(&replacement, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&replacement, &exe).unwrap();

    server.deploy_guest("hello", "hello", None);
    let (status, body) = server.invoke_json("hello", r#"{"name":"Ada"}"#);
    assert_eq!((status, &body["message"]), (200, &Value::from("Hello, Ada!")), "{body}");
}

#[test]
fn a_task_cancelled_on_a_draining_replica_stops_at_once() {
    let server = Server::start("drain-cancel", &[]);
    let config = "[runtime]\nworkers = 1\ntimeout = \"600s\"\n[task_queue]\nretries = 0\n";
    server.deploy_guest("spin", "guest-spin", Some(config));
    let id = submit(&server, "spin", "{}");
    wait_running(&server, &id);
    let old = ready_pids(&server.status("spin"))[0];
    // A new version: the old replica drains, finishing what it runs...
    server.deploy_guest("spin", "guest-spin", Some(config));
    // ...unless that is cancelled.
    let response = server.http.delete(server.url(&format!("/v1/tasks/{id}"))).send().unwrap();
    assert_eq!(response.status(), 200);
    wait_for("the draining replica to stop the cancelled task and exit", LONG, || (!alive(old)).then_some(()));
}

#[test]
fn a_second_node_on_the_same_data_dir_is_refused() {
    let server = Server::start("two-nodes", &[]);
    server.deploy_guest("hello", "hello", None);
    let out = Command::new(env!("CARGO_BIN_EXE_beamlet"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&server.data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is in use by another beamlet serve"), "{stderr}");
    assert_eq!(server.invoke_json("hello", r#"{"name":"Ada"}"#).0, 200, "the first node serves on");
}

#[test]
fn a_node_stopped_by_sigterm_lets_its_replicas_finish_their_tasks() {
    let server = Server::start("shutdown", &[]);
    server.deploy_guest("sleep", "sleep", Some("[runtime]\nworkers = 1\n[task_queue]\nretries = 0\n"));
    let id = submit(&server, "sleep", r#"{"ms": 1500}"#);
    wait_running(&server, &id);
    // Behind it: a queued task, long-polled, and a call whose caller waits.
    let queued = submit(&server, "sleep", r#"{"ms": 1}"#);
    let client = || http_client().timeout(LONG).build().unwrap();
    let poll_url = server.url(&format!("/v1/tasks/{queued}?wait=60s"));
    let poll = std::thread::spawn(move || client().get(poll_url).send().map(|r| (r.status().as_u16(), r.text())));
    let call_url = server.url("/v1/apps/sleep/invoke");
    let call = std::thread::spawn(move || client().post(call_url).body(r#"{"ms": 1}"#).send().map(|r| r.json()));
    server.wait_status("sleep", "the call to queue", LONG, |s| s["queue"]["queued"] == 2);
    // Both requests read by the node (a request still unread when it stops
    // would only see its connection closed).
    wait_for("the call and the poll to wait", LONG, || {
        let metrics = server.http.get(server.url("/metrics")).send().ok()?.text().ok()?;
        metrics.contains("beamlet_waiting_callers 2").then_some(())
    });
    let data_dir = server.terminate();

    // Both answered before the node exited: the call refused, the poll as it stood.
    let call: Value = call.join().unwrap().expect("an answer, not a dropped connection").unwrap();
    assert_eq!(error_code(&call), "SHUTTING_DOWN", "{call}");
    let (status, body) = poll.join().unwrap().expect("an answer, not a dropped connection");
    assert_eq!(status, 200);
    assert!(body.unwrap().contains("\"PENDING\""), "the queued task as it was");

    let server = Server::start_in(data_dir, &[]);
    let record = server.get(&format!("/v1/tasks/{id}"));
    assert_eq!(record["status"], "COMPLETE", "it finished before the node exited: {record}");
    assert_eq!(record["attempts"], 1, "{record}");
    assert_eq!(result(&server, &id)["slept_ms"].as_u64().map(|ms| ms >= 1500), Some(true));
    assert_eq!(result(&server, &queued)["slept_ms"].as_u64().map(|ms| ms >= 1), Some(true), "kept, then run");
}

#[test]
fn a_call_whose_replica_dies_while_its_node_stops_is_answered_at_once() {
    let server = Server::start("shutdown-lost", &["--shutdown-grace", "10m"]);
    let call = running_call(&server, "[runtime]\nworkers = 1\n[task_queue]\nretries = 1\n");
    let replica = server.ready_pids("sleep")[0];
    server.sigterm();
    wait_for("the node to begin its shutdown", LONG, || server.log().contains("shutting down").then_some(()));
    kill9(replica);
    // Its retry would wait for the next start: the caller is answered now,
    // and the node does not wait its grace out for it.
    let call: Value = call.join().unwrap().expect("an answer, not a timeout").unwrap();
    assert_eq!(error_code(&call), "SHUTTING_DOWN", "{call}");
    server.wait_exit();
}

#[test]
fn a_call_still_running_when_the_shutdown_grace_runs_out_is_answered() {
    let server = Server::start("shutdown-cut", &["--shutdown-grace", "1s"]);
    let call = running_call(&server, "[runtime]\nworkers = 1\n");
    server.terminate();
    let call: Value = call.join().unwrap().expect("an answer, not a closed connection").unwrap();
    assert_eq!(error_code(&call), "SHUTTING_DOWN", "{call}");
    assert!(error_message(&call).contains("grace ran out"), "{call}");
}

#[test]
fn sigterm_with_no_request_open_still_lets_running_tasks_finish() {
    // No connection open when the signal comes: the HTTP server ends at
    // once, and the replicas must be drained all the same.
    let server = Server::start("shutdown-idle", &[]);
    let ids = two_running_sleeps(&server, 1500);
    let server = Server::start_in(server.terminate(), &[]);
    for id in &ids {
        let record = server.get(&format!("/v1/tasks/{id}"));
        assert_eq!((&record["status"], &record["attempts"]), (&Value::from("COMPLETE"), &Value::from(1)), "{record}");
    }
}

#[test]
fn apps_survive_a_node_restart_and_replicas_die_with_their_node() {
    let server = Server::start("restart", &[]);
    server.deploy_guest("hello", "hello", None);
    let status = server.wait_status("hello", "a ready replica", LONG, |s| ready_pids(s).len() == 1);
    let replica = ready_pids(&status)[0];
    let data_dir = server.kill();
    wait_for("the orphaned replica to exit", LONG, || (!alive(replica)).then_some(()));

    let mut server = Server::start_in(data_dir, &[]);
    let (status, body) = server.invoke_json("hello", r#"{"name":"again"}"#);
    assert_eq!((status, &body["message"]), (200, &Value::from("Hello, again!")));
    assert_eq!(server.status("hello")["version"], 1);

    // The compiled cache damaged on disk (cut short, or bytes changed
    // within it) is built again from the component.
    for damage in ["cut", "changed"] {
        let data_dir = server.terminate();
        for entry in std::fs::read_dir(data_dir.join("compiled")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|ext| ext != "cwasm") {
                continue;
            }
            let mut bytes = std::fs::read(&path).unwrap();
            match damage {
                "cut" => bytes.truncate(bytes.len() / 2),
                _ => {
                    let quarter = bytes.len() / 4;
                    bytes[quarter..quarter + 4096].fill(0xcc);
                }
            }
            std::fs::write(&path, bytes).unwrap();
        }
        server = Server::start_in(data_dir, &[]);
        let (status, body) = server.invoke_json("hello", r#"{"name":"cache"}"#);
        assert_eq!((status, &body["message"]), (200, &Value::from("Hello, cache!")), "{damage}: {body}");
        assert!(server.log().contains("cannot be used"), "{damage}: {}", server.log());
    }
}

/// Deploys `sleep` with `config` and returns a call of it sleeping 100 s,
/// once it runs, answered as JSON.
fn running_call(server: &Server, config: &str) -> std::thread::JoinHandle<reqwest::Result<reqwest::Result<Value>>> {
    server.deploy_guest("sleep", "sleep", Some(config));
    let client = http_client().timeout(LONG).build().unwrap();
    let url = server.url("/v1/apps/sleep/invoke");
    let call = std::thread::spawn(move || client.post(url).body(r#"{"ms": 100000}"#).send().map(|r| r.json()));
    server.wait_status("sleep", "the call to run", LONG, |s| s["queue"]["running"] == 1);
    call
}

/// Deploys `sleep` with two workers and no retries, and returns the ids of
/// two tasks sleeping `ms` each, once both run.
fn two_running_sleeps(server: &Server, ms: u64) -> Vec<String> {
    server.deploy_guest("sleep", "sleep", Some("[runtime]\nworkers = 2\n[task_queue]\nretries = 0\n"));
    let ids: Vec<String> = (0..2).map(|_| submit(server, "sleep", &format!(r#"{{"ms": {ms}}}"#))).collect();
    for id in &ids {
        wait_running(server, id);
    }
    ids
}

/// Waits until task `id` runs (or was sent to a replica to run).
fn wait_running(server: &Server, id: &str) {
    wait_for(&format!("task {id} to run"), LONG, || {
        (server.get(&format!("/v1/tasks/{id}"))["status"] == "RUNNING").then_some(())
    });
}

#[test]
fn components_no_app_uses_are_deleted_from_the_data_dir() {
    let server = Server::start("collect", &[]);
    let files = |sub: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(server.data_dir.join(sub))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    server.deploy_guest("a", "hello", None);
    server.deploy_guest("b", "hello", None);
    let one = (files("components"), files("compiled"));
    assert_eq!((one.0.len(), one.1.len()), (1, 2), "one component, compiled (and its digest), for both apps: {one:?}");
    // A new version of one app: the old component is still the other's.
    server.deploy_guest("a", "sleep", None);
    assert_eq!((files("components").len(), files("compiled").len()), (2, 4));
    assert_eq!(server.http.delete(server.url("/v1/apps/b")).send().unwrap().status(), 200);
    wait_for("hello's files to go", LONG, || {
        (files("components").len() == 1 && files("compiled").len() == 2).then_some(())
    });
    assert_eq!(server.http.delete(server.url("/v1/apps/a")).send().unwrap().status(), 200);
    wait_for("every file to go", LONG, || {
        (files("components").is_empty() && files("compiled").is_empty()).then_some(())
    });
    // What is left works: deploy and call again.
    server.deploy_guest("a", "hello", None);
    assert_eq!(server.invoke_json("a", r#"{"name":"Ada"}"#).0, 200);
}
