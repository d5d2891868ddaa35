//! The task queue end to end: lifecycle, retries, cancellation, expiry,
//! backpressure, result limits and crash safety, against a real node.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const LONG: Duration = Duration::from_secs(60);

fn submit(server: &Server, app: &str, input: &str) -> (u16, Value) {
    let response =
        server.http.post(server.url(&format!("/v1/apps/{app}/tasks"))).body(input.to_owned()).send().unwrap();
    (response.status().as_u16(), response.json().unwrap())
}

/// Queues a task whose end is POSTed to `callback_url`; returns its id.
fn submit_with_callback(server: &Server, app: &str, input: &str, callback_url: &str) -> String {
    let url = server.url(&format!("/v1/apps/{app}/tasks?callback_url={callback_url}"));
    let response = server.http.post(url).body(input.to_owned()).send().unwrap();
    response.json::<Value>().unwrap()["task_id"].as_str().unwrap().to_owned()
}

fn submit_ok(server: &Server, app: &str, input: &str) -> String {
    let (status, body) = submit(server, app, input);
    assert_eq!(status, 202, "{body}");
    body["task_id"].as_str().unwrap().to_owned()
}

fn task(server: &Server, id: &str) -> Value {
    server.get(&format!("/v1/tasks/{id}"))
}

fn wait_task(server: &Server, id: &str) -> Value {
    server.get(&format!("/v1/tasks/{id}?wait=60s"))
}

fn wait_status(server: &Server, id: &str, status: &str) -> Value {
    wait_for(&format!("task {id} to be {status}"), LONG, || {
        let record = task(server, id);
        (record["status"] == status).then_some(record)
    })
}

fn cancel(server: &Server, id: &str) -> (u16, Value) {
    let response = server.http.delete(server.url(&format!("/v1/tasks/{id}"))).send().unwrap();
    (response.status().as_u16(), response.json().unwrap())
}

#[test]
fn retries_carry_the_attempt_number_and_results_have_a_size_limit() {
    let server = Server::start("retries", &[]);
    server.deploy_guest("trap", "guest-trap", Some("[task_queue]\nretries = 2\nmax_result_size = \"1Ki\"\n"));

    let id = submit_ok(&server, "trap", r#"{"mode":"flaky","succeed_on":3}"#);
    let record = wait_task(&server, &id);
    assert_eq!((record["status"].as_str(), record["attempts"].as_u64()), (Some("COMPLETE"), Some(3)), "{record}");
    let result: Value = server.http.get(server.url(&format!("/v1/tasks/{id}/result"))).send().unwrap().json().unwrap();
    assert_eq!(result["attempt"], 3, "the guest saw its attempt number");

    let id = submit_ok(&server, "trap", r#"{"mode":"flaky","succeed_on":9}"#);
    let record = wait_task(&server, &id);
    assert_eq!((record["status"].as_str(), record["attempts"].as_u64()), (Some("FAILED"), Some(3)), "{record}");
    assert_eq!(record["error"]["code"], "GUEST_TRAP");
    let response = server.http.get(server.url(&format!("/v1/tasks/{id}/result"))).send().unwrap();
    assert_eq!(response.status(), 500, "the result of a failed task is its error");
    let body: Value = response.json().unwrap();
    assert!(
        error_message(&body).starts_with("after 3 attempts: guest trapped: "),
        "says it ran more than once: {body}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_beamlet"))
        .args(["task", "list", "trap", "--status", "FAILED", "--server", &server.base])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    let line = listed.lines().find(|line| line.starts_with(id.as_str())).unwrap_or_default().to_owned();
    assert!(line.contains("FAILED") && line.ends_with("GUEST_TRAP"), "the CLI lists it: {listed}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_beamlet"))
        .args(["task", "wait", &id, "--server", &server.base])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("ended FAILED: ") && said.contains("(GUEST_TRAP"), "{said}");

    let (status, body) = server.invoke_json("trap", r#"{"mode":"big","bytes":4096}"#);
    assert_eq!((status, error_code(&body)), (500, "RESULT_TOO_LARGE"), "{body}");
    assert!(error_message(&body).contains("1Ki"), "{body}");
    assert_eq!(server.invoke_json("trap", r#"{"mode":"big","bytes":100}"#).0, 200);

    // The CLI's view of the same queue.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_beamlet"))
        .args(["task", "submit", "trap", "--data", r#"{"mode":"ok"}"#, "--server", &server.base])
        .output()
        .unwrap();
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(!id.is_empty(), "task submit prints the id");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_beamlet"))
        .args(["task", "wait", &id, "--server", &server.base])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ok\": true"));
}

#[test]
fn cancel_expiry_backpressure_and_listing() {
    let server = Server::start("lifecycle", &[]);
    let config = "[runtime]\ntimeout = \"5s\"\n[task_queue]\nretries = 0\nttl = \"1s\"\nmax_queued = 1\n";
    server.deploy_guest("spin", "guest-spin", Some(config));
    let pid = server.wait_status("spin", "a ready replica", LONG, |s| ready_pids(s).len() == 1);
    let pid = ready_pids(&pid);

    let running = submit_ok(&server, "spin", "{}");
    wait_status(&server, &running, "RUNNING");
    let result = |query: &str| {
        let response = server.http.get(server.url(&format!("/v1/tasks/{running}/result{query}"))).send().unwrap();
        (response.status().as_u16(), response.json::<Value>().unwrap())
    };
    for query in ["", "?wait=200ms"] {
        let (status, body) = result(query);
        assert_eq!((status, error_code(&body)), (409, "NOT_FINISHED"), "{query}: {body}");
        assert!(error_message(&body).contains("/result?wait="), "says how to wait for it: {body}");
    }
    let (status, body) = result("?wiat=1s");
    assert_eq!((status, error_code(&body)), (400, "BAD_REQUEST"), "{body}");
    let queued = submit_ok(&server, "spin", "{}");
    assert_eq!(task(&server, &queued)["status"], "PENDING");
    let (status, body) = submit(&server, "spin", "{}");
    assert_eq!((status, error_code(&body)), (429, "QUEUE_FULL"), "{body}");
    assert!(error_message(&body).contains("max_queued"), "says what to change: {body}");
    let response = server.http.post(server.url("/v1/apps/spin/tasks")).body("{}").send().unwrap();
    assert_eq!(
        (response.status().as_u16(), response.headers().get("retry-after").cloned()),
        (429, Some("1".parse().unwrap()))
    );

    let record = wait_status(&server, &queued, "EXPIRED");
    assert_eq!((record["attempts"].as_u64(), record["error"]["code"].as_str()), (Some(0), Some("EXPIRED")));

    let doomed = submit_ok(&server, "spin", "{}");
    let (status, record) = cancel(&server, &doomed);
    assert_eq!((status, record["status"].as_str(), record["attempts"].as_u64()), (200, Some("CANCELLED"), Some(0)));
    let (status, body) = cancel(&server, &doomed);
    assert_eq!((status, error_code(&body)), (409, "ALREADY_ENDED"));

    let (status, record) = cancel(&server, &running);
    assert_eq!((status, record["status"].as_str()), (200, Some("CANCELLED")), "{record}");
    // The worker was interrupted and freed, without restarting the replica.
    let next = submit_ok(&server, "spin", "{}");
    wait_status(&server, &next, "RUNNING");
    assert_eq!(cancel(&server, &next).0, 200);
    assert_eq!(server.ready_pids("spin"), pid);
    assert_eq!(task(&server, &running)["status"], "CANCELLED", "a late report does not change a cancelled task");

    let listed = server.get("/v1/apps/spin/tasks?status=CANCELLED");
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 3, "{listed}");
    let all = server.get("/v1/apps/spin/tasks");
    assert_eq!(all["tasks"].as_array().unwrap().len(), 4);
    assert_eq!(all["next"], Value::Null, "one page holds them all");
    assert_eq!(server.get("/v1/apps/spin/tasks?limit=4")["next"], Value::Null, "a last page just full is the last");
    // Page by page: `next` is where the following page starts.
    let ids = |page: &Value| page["tasks"].as_array().unwrap().iter().map(|t| t["id"].clone()).collect::<Vec<_>>();
    let first = server.get("/v1/apps/spin/tasks?limit=3");
    assert_eq!(ids(&first), ids(&all)[..3]);
    let next = first["next"].as_str().unwrap();
    let second = server.get(&format!("/v1/apps/spin/tasks?limit=3&before={next}"));
    assert_eq!((ids(&second), &second["next"]), (ids(&all)[3..].to_vec(), &Value::Null));
    let upper = server.get(&format!("/v1/apps/spin/tasks?limit=3&before={}", next.to_uppercase()));
    assert_eq!(ids(&upper), ids(&second), "an id in capitals is the same id");
    assert_eq!(error_code(&server.get("/v1/apps/spin/tasks?before=x")), "BAD_REQUEST");
    let bad = server.get("/v1/apps/spin/tasks?status=DONE");
    assert_eq!(error_code(&bad), "BAD_REQUEST");
    let (status, body) = cancel(&server, "no-such-task");
    assert_eq!((status, error_code(&body)), (404, "UNKNOWN_TASK"));
}

#[test]
fn deleting_an_app_cancels_its_running_tasks_too() {
    let server = Server::start("delete-running", &[]);
    let config = "[runtime]\nworkers = 1\ntimeout = \"3s\"\n[task_queue]\nretries = 2\n";
    server.deploy_guest("doomed", "sleep", Some(config));
    let running = submit_ok(&server, "doomed", r#"{"ms": 10000}"#);
    let queued = submit_ok(&server, "doomed", r#"{"ms": 1}"#);
    wait_status(&server, &running, "RUNNING");
    let pid = ready_pids(&server.status("doomed"))[0];
    assert_eq!(server.http.delete(server.url("/v1/apps/doomed")).send().unwrap().status(), 200);

    for id in [&running, &queued] {
        let record = task(&server, id);
        assert_eq!(record["status"], "CANCELLED", "{record}");
        assert_eq!(record["error"]["message"], "app \"doomed\" was removed", "{record}");
    }
    wait_for("the removed app's replica to stop its task and exit", LONG, || (!alive(pid)).then_some(()));
    // A new app of the same name starts clean: the old tasks stay cancelled.
    server.deploy_guest("doomed", "hello", None);
    assert_eq!(server.invoke_json("doomed", r#"{"name": "new"}"#).0, 200);
    assert_eq!(task(&server, &running)["status"], "CANCELLED");
    assert_eq!(server.status("doomed")["queue"]["queued"], 0);
}

#[test]
fn a_new_world_is_refused_while_the_app_has_tasks_it_could_not_run() {
    let server = Server::start("world-change", &[]);
    server.deploy_guest("morph", "sleep", Some("[runtime]\nworkers = 1\n"));
    let running = submit_ok(&server, "morph", r#"{"ms": 60000}"#);
    let queued = submit_ok(&server, "morph", r#"{"ms": 1}"#);
    wait_status(&server, &running, "RUNNING");
    let http = std::fs::read(wasm("guest-http")).unwrap();
    let response = server.deploy("morph", &http, None);
    assert_eq!(response.status(), 409);
    let body: Value = response.json().unwrap();
    assert_eq!(error_code(&body), "WORLD_CHANGED", "{body}");
    assert!(error_message(&body).contains("2 queued or running tasks"), "{body}");
    assert_eq!(server.status("morph")["version"], 1, "the app is as it was");

    // The queued one first: cancelling the running one frees the worker for it.
    for id in [&queued, &running] {
        assert_eq!(cancel(&server, id).0, 200);
    }
    assert_eq!(server.deploy("morph", &http, None).status(), 201, "nothing left that it could not run");
}

#[test]
fn a_call_whose_caller_goes_away_is_cancelled() {
    let server = Server::start("abandoned", &[]);
    server.deploy_guest("spin", "guest-spin", Some("[runtime]\nworkers = 1\ntimeout = \"600s\"\n"));
    server.wait_status("spin", "a ready replica", LONG, |s| ready_pids(s).len() == 1);
    let impatient = http_client().timeout(Duration::from_secs(1)).build().unwrap();
    assert!(impatient.post(server.url("/v1/apps/spin/invoke")).body("{}").send().is_err(), "it never answers");
    server.wait_status("spin", "the abandoned call's task to stop", LONG, |status| {
        status["queue"]["running"] == 0 && status["replicas"][0]["busy"] == 0
    });
}

#[test]
fn queued_and_running_tasks_survive_kill_9_of_serve() {
    let server = Server::start("durable", &[]);
    server.deploy_guest("sleep", "sleep", Some("[task_queue]\nretries = 3\n"));
    let finished = submit_ok(&server, "sleep", r#"{"ms": 1}"#);
    assert_eq!(wait_task(&server, &finished)["status"], "COMPLETE");
    let running = submit_ok(&server, "sleep", r#"{"ms": 3000}"#);
    wait_status(&server, &running, "RUNNING");
    let queued: Vec<String> = (0..3).map(|_| submit_ok(&server, "sleep", r#"{"ms": 1}"#)).collect();
    let replica = server.ready_pids("sleep");
    let data_dir = server.kill();
    for pid in replica {
        wait_for("the replica to exit with its node", LONG, || (!alive(pid)).then_some(()));
    }

    let server = Server::start_in(data_dir, &[]);
    let record = wait_task(&server, &running);
    assert_eq!((record["status"].as_str(), record["attempts"].as_u64()), (Some("COMPLETE"), Some(2)), "{record}");
    for id in &queued {
        let record = wait_task(&server, id);
        assert_eq!((record["status"].as_str(), record["attempts"].as_u64()), (Some("COMPLETE"), Some(1)), "{record}");
    }
    let record = task(&server, &finished);
    assert_eq!(record["status"], "COMPLETE");
    let result: Value =
        server.http.get(server.url(&format!("/v1/tasks/{finished}/result"))).send().unwrap().json().unwrap();
    assert!(result["slept_ms"].as_u64().is_some_and(|ms| ms >= 1), "finished results are kept: {result}");
}

#[test]
fn tasks_of_an_app_whose_removal_a_crash_cut_short_are_cancelled_on_restart() {
    let server = Server::start("removed-crash", &[]);
    server.deploy_guest("sleep", "sleep", Some("[runtime]\nworkers = 1\n"));
    let running = submit_ok(&server, "sleep", r#"{"ms": 60000}"#);
    wait_status(&server, &running, "RUNNING");
    let queued = submit_ok(&server, "sleep", r#"{"ms": 1}"#);
    let data_dir = server.kill();
    // What a node killed as it removed the app leaves: the app gone from
    // the data dir, its tasks not yet cancelled in the task store.
    std::fs::remove_file(data_dir.join("apps").join("sleep.json")).unwrap();
    std::fs::write(data_dir.join("removed-secrets.json"), r#"{"sleep": "secret"}"#).unwrap();

    let server = Server::start_in(data_dir, &[]);
    for id in [&running, &queued] {
        let record = task(&server, id);
        assert_eq!(record["status"], "CANCELLED", "{record}");
        assert_eq!(record["error"]["message"], r#"app "sleep" was removed"#, "{record}");
    }
    assert!(server.log().contains("cancelled the tasks left of an app removed"), "{}", server.log());
}

#[test]
fn task_wait_waits_on_through_a_restart_of_the_node() {
    let server = Server::start("wait-restart", &[]);
    server.deploy_guest("sleep", "sleep", None);
    let id = submit_ok(&server, "sleep", r#"{"ms": 2000}"#);
    wait_status(&server, &id, "RUNNING");
    let wait = std::process::Command::new(env!("CARGO_BIN_EXE_beamlet"))
        .args(["task", "wait", &id, "--timeout", "120s", "--server", &server.base])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Back on the same address: the wait carries on and gets the result.
    let listen = server.base.trim_start_matches("http://").to_owned();
    let data_dir = server.kill();
    let server = Server::start_in(data_dir, &["--listen", &listen]);
    let out = wait.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("waiting for it to come back"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("slept_ms"), "{stderr}");
    assert_eq!(task(&server, &id)["attempts"], 2);
}

#[test]
fn a_callback_not_delivered_when_the_node_dies_is_delivered_after_its_restart() {
    let server = Server::start("callback-restart", &[]);
    server.deploy_guest("hello", "hello", None);
    // Nothing listens there yet: every delivery fails.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let id = submit_with_callback(&server, "hello", r#"{"name": "Cy"}"#, &format!("http://{addr}/hook"));
    assert_eq!(wait_task(&server, &id)["status"], "COMPLETE");
    let data_dir = server.kill();

    let (_, hook) = receiver_at(&addr, 0);
    let server = Server::start_in(data_dir, &[]);
    wait_for("the callback after the restart", LONG, || (!hook.lock().unwrap().is_empty()).then_some(()));
    let delivery = &hook.lock().unwrap()[0];
    assert_eq!(
        (delivery.headers["x-beamlet-task-id"].as_str(), delivery.headers["x-beamlet-status"].as_str()),
        (id.as_str(), "COMPLETE")
    );
    let body: Value = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(body["message"], "Hello, Cy!");
    drop(server);
}

#[test]
fn no_task_is_lost_when_replicas_die_and_tasks_are_cancelled_under_load() {
    let server = Server::start("no-loss", &[]);
    let config = "[runtime]\nworkers = 2\n[task_queue]\nretries = 3\nmax_queued = 1000\n";
    server.deploy_guest("sleep", "sleep", Some(config));
    server.wait_status("sleep", "a ready replica", LONG, |s| ready_pids(s).len() == 1);
    // Short tasks: the replica is sent runs ahead of its workers.
    let ids: Vec<String> = (0..300).map(|i| submit_ok(&server, "sleep", &format!(r#"{{"ms": {}}}"#, i % 3))).collect();
    let cancelled: Vec<&String> = ids.iter().skip(7).step_by(15).collect();
    for (round, id) in cancelled.iter().enumerate() {
        let _ = cancel(&server, id);
        if round % 10 == 5 {
            // Kill the replica while it holds runs in progress and runs sent ahead.
            if let Some(pid) = server.ready_pids("sleep").first() {
                kill9(*pid);
            }
        }
    }
    let mut complete = 0;
    for id in &ids {
        let record = wait_task(&server, id);
        let status = record["status"].as_str().unwrap();
        if cancelled.contains(&id) {
            assert!(status == "CANCELLED" || status == "COMPLETE", "{record}");
        } else {
            assert_eq!(status, "COMPLETE", "every task not cancelled completes: {record}");
        }
        if status == "COMPLETE" {
            complete += 1;
            let attempts = record["attempts"].as_u64().unwrap();
            assert!((1..=4).contains(&attempts), "{record}");
        }
    }
    assert!(complete >= ids.len() - cancelled.len(), "{complete} complete");
    let status = server.status("sleep");
    assert_eq!(
        (status["queue"]["queued"].as_u64(), status["queue"]["running"].as_u64()),
        (Some(0), Some(0)),
        "{status}"
    );
    assert!(status["replicas"][0]["restarts"].as_u64() >= Some(1), "a replica was killed mid-way: {status}");
}

fn expected_signature(secret: &str, timestamp: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

#[test]
fn callbacks_are_signed_retried_and_overridable_per_task() {
    let server = Server::start("callbacks", &[]);
    let (app_url, app_hook) = receiver(1);
    let deployed =
        server.deploy_guest("hello", "hello", Some(&format!("[task_queue]\ncallback_url = \"{app_url}\"\n")));
    let secret = deployed["callback_secret"].as_str().unwrap().to_owned();
    assert!(secret.len() >= 32, "each app gets a callback secret");

    let id = submit_ok(&server, "hello", r#"{"name":"Ada"}"#);
    assert_eq!(wait_task(&server, &id)["status"], "COMPLETE");
    wait_for("the callback to be retried and delivered", LONG, || (app_hook.lock().unwrap().len() == 2).then_some(()));
    let hook = app_hook.lock().unwrap();
    for delivery in hook.iter() {
        let headers = &delivery.headers;
        assert_eq!(headers["x-beamlet-task-id"], id);
        assert_eq!(headers["x-beamlet-status"], "COMPLETE");
        let signature = expected_signature(&secret, &headers["x-beamlet-timestamp"], &delivery.body);
        assert_eq!(headers["x-beamlet-signature"], signature, "the signature verifies with the app's secret");
        assert_ne!(expected_signature("wrong secret", &headers["x-beamlet-timestamp"], &delivery.body), signature);
        let body: Value = serde_json::from_slice(&delivery.body).unwrap();
        assert_eq!(body["message"], "Hello, Ada!");
    }
    drop(hook);
    // The task says where its callback stands.
    let settled = || (task(&server, &id)["callback"] == "delivered").then_some(());
    wait_for("the task to show its callback delivered", LONG, settled);

    // A call whose caller waits sends the app's callback too, with its output.
    assert_eq!(server.invoke_json("hello", r#"{"name":"Bo"}"#).0, 200);
    wait_for("the invoke's callback", LONG, || (app_hook.lock().unwrap().len() == 3).then_some(()));
    let body: Value = serde_json::from_slice(&app_hook.lock().unwrap()[2].body).unwrap();
    assert_eq!(body["message"], "Hello, Bo!");

    let (task_url, task_hook) = receiver(0);
    let id = submit_with_callback(&server, "hello", r#"{"name": ""}"#, &task_url);
    assert_eq!(wait_task(&server, &id)["status"], "FAILED");
    wait_for("the per-task callback", LONG, || (task_hook.lock().unwrap().len() == 1).then_some(()));
    let delivery = &task_hook.lock().unwrap()[0];
    assert_eq!(delivery.headers["x-beamlet-status"], "FAILED");
    let body: Value = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(body["error"]["code"], "BAD_INPUT", "{body}");
    assert_eq!(app_hook.lock().unwrap().len(), 3, "the per-task URL replaced the app's");

    let (status, body) = submit(&server, "hello", "{}");
    assert_eq!(status, 202, "{body}");
    let response = server.http.post(server.url("/v1/apps/hello/tasks?callback_url=ftp://x")).body("{}").send().unwrap();
    assert_eq!(response.status(), 400);
}

#[test]
fn the_tasks_a_removal_cancels_get_their_callbacks() {
    let server = Server::start("callbacks-removed", &[]);
    let (url, hook) = receiver(0);
    let config = format!("[runtime]\nworkers = 1\n[task_queue]\ncallback_url = \"{url}\"\n");
    let deployed = server.deploy_guest("sleep", "sleep", Some(&config));
    let secret = deployed["callback_secret"].as_str().unwrap().to_owned();
    let running = submit_ok(&server, "sleep", r#"{"ms": 60000}"#);
    wait_for("the task to run", LONG, || (task(&server, &running)["status"] == "RUNNING").then_some(()));
    let queued = submit_ok(&server, "sleep", r#"{"ms": 1}"#);
    let removed = server.http.delete(server.url("/v1/apps/sleep")).send().unwrap();
    assert_eq!(removed.status(), 200);

    wait_for("both callbacks", LONG, || (hook.lock().unwrap().len() == 2).then_some(()));
    let hook = hook.lock().unwrap();
    let mut ids: Vec<&str> = hook.iter().map(|delivery| delivery.headers["x-beamlet-task-id"].as_str()).collect();
    ids.sort_unstable();
    let mut expected = [running.as_str(), queued.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected);
    for delivery in hook.iter() {
        let headers = &delivery.headers;
        assert_eq!(headers["x-beamlet-status"], "CANCELLED");
        let signature = expected_signature(&secret, &headers["x-beamlet-timestamp"], &delivery.body);
        assert_eq!(headers["x-beamlet-signature"], signature, "signed with the removed app's secret");
        let body: Value = serde_json::from_slice(&delivery.body).unwrap();
        assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("was removed")), "{body}");
    }
    drop(hook);

    // Still undelivered when the node stops (its receiver is down): sent
    // once it is back, signed with the removed app's secret all the same.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let config = format!("[task_queue]\ncallback_url = \"http://{addr}/hook\"\n");
    let deployed = server.deploy_guest("late", "sleep", Some(&config));
    let secret = deployed["callback_secret"].as_str().unwrap().to_owned();
    let id = submit_ok(&server, "late", r#"{"ms": 60000}"#);
    assert_eq!(server.http.delete(server.url("/v1/apps/late")).send().unwrap().status(), 200);
    assert_eq!(task(&server, &id)["callback"], "pending");
    // The name deployed and removed again meanwhile: another app, another secret.
    let again = server.deploy_guest("late", "sleep", Some(&config));
    assert_ne!(again["callback_secret"].as_str(), Some(secret.as_str()));
    assert_eq!(server.http.delete(server.url("/v1/apps/late")).send().unwrap().status(), 200);
    let server = Server::start_in(server.terminate(), &[]);
    let (_, hook) = receiver_at(&addr, 0);
    wait_for("the callback", LONG, || (hook.lock().unwrap().len() == 1).then_some(()));
    let hook = hook.lock().unwrap();
    let headers = &hook[0].headers;
    assert_eq!(
        (headers["x-beamlet-task-id"].as_str(), headers["x-beamlet-status"].as_str()),
        (id.as_str(), "CANCELLED")
    );
    let signature = expected_signature(&secret, &headers["x-beamlet-timestamp"], &hook[0].body);
    assert_eq!(headers["x-beamlet-signature"], signature);
    wait_for("the callback settled", LONG, || (task(&server, &id)["callback"] == "delivered").then_some(()));
}

#[test]
fn a_node_whose_task_store_saves_nothing_is_not_ready_until_it_saves_again() {
    let server = Server::start("store-blocked", &[]);
    server.deploy_guest("hello", "hello", None);
    let ready = || server.http.get(server.url("/readyz")).send().unwrap();
    assert_eq!(ready().status(), 200);
    // Another writer holds the store: the node's commits fail, as on a full disk.
    let blocker = rusqlite::Connection::open(server.data_dir.join("tasks.db")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (status, body) = submit(&server, "hello", r#"{"name": "Di"}"#);
    assert_eq!((status, error_code(&body)), (503, "STORE_FAILED"), "{body}");
    let refused = ready();
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().unwrap();
    assert_eq!(error_code(&body), "STORE_FAILED");
    assert!(error_message(&body).contains("saves nothing now"), "{body}");

    blocker.execute_batch("COMMIT").unwrap();
    wait_for("the node to be ready again", Duration::from_secs(60), || (ready().status() == 200).then_some(()));
    let id = submit_ok(&server, "hello", r#"{"name": "Di"}"#);
    assert_eq!(wait_task(&server, &id)["status"], "COMPLETE");
}

#[test]
fn a_callback_to_an_https_url_is_delivered_over_tls() {
    let (url, hook, ca) = tls_receiver();
    // The node trusts the receiver's CA as a system's roots would be.
    let ca_file = temp_dir("callback-tls-ca").join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let server = Server::start_with_env("callback-tls", &[], &[("SSL_CERT_FILE", ca_file.as_os_str())]);
    server.deploy_guest("hello", "hello", None);
    let id = submit_with_callback(&server, "hello", r#"{"name": "Tls"}"#, &url);
    let delivered = || (task(&server, &id)["callback"] == "delivered").then_some(());
    wait_for("the callback to be delivered", LONG, delivered);
    let received = hook.lock().unwrap();
    assert_eq!(received[0].body, br#"{"message":"Hello, Tls!"}"#);
    assert_eq!(received[0].headers["x-beamlet-task-id"], id);
}

#[test]
fn a_callback_pointed_at_a_node_queues_nothing_and_guests_may_call_apps_but_not_manage_them() {
    let server = Server::start("callback-loop", &[]);
    // Each task's result would be submitted as a new task, without end.
    let config = format!("[task_queue]\ncallback_url = \"{}\"\n", server.url("/v1/apps/loop/tasks"));
    server.deploy_guest("loop", "hello", Some(&config));
    let id = submit_ok(&server, "loop", r#"{"name":"x"}"#);
    wait_for("the task to end", Duration::from_secs(30), || (task(&server, &id)["status"] == "COMPLETE").then_some(()));
    // Its callback is tried at once, and again within a second: none queues a task.
    std::thread::sleep(Duration::from_secs(2));
    let listed = server.get("/v1/apps/loop/tasks");
    assert_eq!(listed["tasks"].as_array().map(Vec::len), Some(1), "one task, not one per callback");
    // Nor at an app, which could pass it on to the API.
    for path in ["/v1/apps/loop/tasks", "/http/relay/forward"] {
        let refused = server.http.post(server.url(path)).header("x-beamlet-signature", "sha256=0").body("{}");
        let body: Value = refused.send().unwrap().json().unwrap();
        assert!(error_message(&body).contains("a callback_url must point at your own receiver"), "{path}: {body}");
    }

    // A guest's request (marked by the host) may call an app, not manage it.
    let guest = |request: reqwest::blocking::RequestBuilder| request.header("x-beamlet-guest", "1").send().unwrap();
    let called = guest(server.http.post(server.url("/v1/apps/loop/invoke")).body(r#"{"name":"g"}"#));
    assert_eq!(called.status(), 200);
    let tasks = server.url("/v1/apps/loop/tasks?callback_url=http://10.0.0.1/");
    for request in [
        server.http.delete(server.url("/v1/apps/loop")),
        server.http.get(server.url("/v1/apps/loop")),
        server.http.get(server.url("/metrics")),
        // Its results would reach a host its allowed_outbound_hosts may not list.
        server.http.post(tasks).body(r#"{"name":"g"}"#),
    ] {
        let response = guest(request);
        assert_eq!(response.status(), 403);
        let body: Value = response.json().unwrap();
        assert_eq!(error_code(&body), "FORBIDDEN", "{body}");
    }
    assert_eq!(server.status("loop")["name"], "loop", "still deployed");
}

#[test]
fn inputs_held_past_the_node_budget_are_refused_with_429() {
    let server = Server::start("input-budget", &["--max-task-bytes", "2Ki"]);
    server.deploy_guest("sleep", "sleep", Some("[runtime]\nworkers = 1\n"));
    // About 900 bytes each: two fit the node's 2 KiB, a third waits for one to end.
    let input = format!(r#"{{"ms": 30000, "pad": "{}"}}"#, "x".repeat(880));
    let first = submit_ok(&server, "sleep", &input);
    submit_ok(&server, "sleep", &input);
    let (status, body) = submit(&server, "sleep", &input);
    assert_eq!((status, error_code(&body)), (429, "QUEUE_FULL"), "{body}");
    assert!(error_message(&body).contains("serve --max-task-bytes"), "{body}");
    let cancelled = server.http.delete(server.url(&format!("/v1/tasks/{first}"))).send().unwrap();
    assert_eq!(cancelled.status(), 200);
    submit_ok(&server, "sleep", &input);
}
