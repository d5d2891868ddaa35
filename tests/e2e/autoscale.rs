//! Autoscaling end to end with the `sleep` example, scaled down in time.
//! These check behaviour (which replicas ran what, how many existed), never
//! how fast anything was.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const LONG: Duration = Duration::from_secs(90);

fn live_replicas(status: &Value) -> usize {
    status["replicas"].as_array().map_or(0, |r| r.len())
}

#[test]
fn request_latency_runs_simultaneous_tasks_on_separate_replicas_then_scales_back() {
    let server = Server::start("latency", &[]);
    let config = "[autoscaler]\nkind = \"request_latency\"\ndesired_latency = \"500ms\"\nmax_replicas = 5\n\
                  min_replicas = 1\nkeep_warm = \"1s\"\n";
    server.deploy_guest("sleep", "sleep", Some(config));
    server.wait_status("sleep", "the minimum replica", LONG, |s| ready_pids(s).len() == 1);

    let ids: Vec<String> = (0..3).map(|_| submit(&server, "sleep", r#"{"ms": 1000}"#)).collect();
    let replicas: BTreeSet<String> =
        ids.iter().map(|id| result(&server, id)["replica"].as_str().unwrap().to_owned()).collect();
    assert_eq!(replicas.len(), 3, "three tasks ran on three replicas: {replicas:?}");

    let status =
        server.wait_status("sleep", "the surplus replicas to stop after keep_warm", LONG, |s| live_replicas(s) == 1);
    assert!(status["autoscaler"]["reason"].as_str().unwrap().contains("request_latency"), "{status}");
    assert_eq!(status["autoscaler"]["desired"], 1);
}

#[test]
fn queue_depth_peaks_at_max_replicas_and_scales_to_zero() {
    let server = Server::start("depth", &[]);
    let config = "[autoscaler]\nkind = \"queue_depth\"\nmax_tasks_per_replica = 3\nmax_replicas = 3\n\
                  min_replicas = 0\nkeep_warm = \"1s\"\n";
    server.deploy_guest("sleep", "sleep", Some(config));
    assert_eq!(live_replicas(&server.status("sleep")), 0, "min_replicas 0 starts cold");

    let ids: Vec<String> = (0..12).map(|_| submit(&server, "sleep", r#"{"ms": 300}"#)).collect();
    let mut peak = 0;
    let mut replicas = BTreeSet::new();
    for id in &ids {
        loop {
            let status = server.status("sleep");
            peak = peak.max(live_replicas(&status));
            let record = server.get(&format!("/v1/tasks/{id}"));
            if record["status"] == "COMPLETE" {
                break;
            }
            assert!(!record["status"].as_str().unwrap().ends_with("ED") || record["status"] == "COMPLETE", "{record}");
            std::thread::sleep(Duration::from_millis(20));
        }
        replicas.insert(result(&server, id)["replica"].as_str().unwrap().to_owned());
    }
    assert!(peak <= 3, "never more than max_replicas: saw {peak}");
    assert_eq!(replicas.len(), 3, "the backlog of 12 used 3 replicas: {replicas:?}");

    let metrics = server.http.get(server.url("/metrics")).send().unwrap().text().unwrap();
    for expected in [
        r#"beamlet_task_duration_seconds_count{app="sleep"} 12"#,
        r#"beamlet_task_runs_total{app="sleep",outcome="complete"} 12"#,
        r#"beamlet_scale_events_total{app="sleep",direction="up"} 3"#,
        r#"beamlet_queue_depth{app="sleep"} 0"#,
    ] {
        assert!(metrics.contains(expected), "/metrics lacks {expected}:\n{metrics}");
    }

    server.wait_status("sleep", "scale to zero after keep_warm", LONG, |s| live_replicas(s) == 0);
    let metrics = server.http.get(server.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains(r#"beamlet_scale_events_total{app="sleep",direction="down"} 3"#), "{metrics}");
    assert!(metrics.contains(r#"beamlet_replicas{app="sleep",state="ready"} 0"#), "zero, not gone: {metrics}");
    // A cold app starts a replica for the next task at once.
    let id = submit(&server, "sleep", r#"{"ms": 1}"#);
    assert_eq!(result(&server, &id)["slept_ms"].as_u64().map(|ms| ms >= 1), Some(true));
}

#[test]
fn a_replica_that_does_not_fit_is_pending_until_capacity_frees() {
    let server = Server::start("placement", &["--cpus", "1"]);
    let response = server.deploy("huge", &std::fs::read(wasm("hello")).unwrap(), Some("[runtime]\ncpu = 2\n"));
    let (status, body) = (response.status().as_u16(), response.json::<Value>().unwrap());
    assert_eq!((status, error_code(&body)), (400, "BAD_CONFIG"), "more cores than the node has: {body}");
    assert!(error_message(&body).contains("more than the 1 core this node has"), "{body}");
    let deployed = server.deploy_guest("hello", "hello", Some("[runtime]\ncpu = 1\n"));
    assert_eq!(deployed["warnings"].as_array().map(Vec::len), Some(0), "it fits: {deployed}");
    server.wait_status("hello", "hello's replica", LONG, |s| ready_pids(s).len() == 1);
    let deployed = server.deploy_guest("sleep", "sleep", Some("[runtime]\ncpu = 1\n"));
    let warning = deployed["warnings"][0].as_str().unwrap_or_default();
    assert!(warning.starts_with("no replica of it fits on this node now (waiting for 1 core;"), "{deployed}");
    let status = server.wait_status("sleep", "a pending replica", LONG, |s| s["replicas"][0]["state"] == "pending");
    let reason = status["replicas"][0]["pending_reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("waiting for 1 core;"), "status says why: {status}");

    // A call whose caller waits is refused at once; a queued task waits.
    let (status, body) = server.invoke_json("sleep", r#"{"ms": 1}"#);
    assert_eq!((status, error_code(&body)), (503, "NO_CAPACITY"), "{body}");
    assert!(error_message(&body).contains("waiting for 1 core;"), "says why: {body}");
    assert!(error_message(&body).contains("(held now by hello (1 replica))"), "and who has it: {body}");
    let id = submit(&server, "sleep", r#"{"ms": 1}"#);
    assert_eq!(server.get(&format!("/v1/tasks/{id}"))["status"], "PENDING", "the task waits, it is not dropped");
    // An app scaled to zero has no replica to be pending when the call
    // comes: the call is refused once the replica it starts finds no room.
    let config = "[runtime]\ncpu = 1\n[autoscaler]\nkind = \"queue_depth\"\nmin_replicas = 0\n";
    server.deploy_guest("cold", "sleep", Some(config));
    let (status, body) = server.invoke_json("cold", r#"{"ms": 1}"#);
    assert_eq!((status, error_code(&body)), (503, "NO_CAPACITY"), "{body}");
    assert!(error_message(&body).contains("waiting for 1 core;"), "says why: {body}");
    let response = server.http.delete(server.url("/v1/apps/cold")).send().unwrap();
    assert_eq!(response.status(), 200);
    let response = server.http.delete(server.url("/v1/apps/hello")).send().unwrap();
    assert_eq!(response.status(), 200);
    let done = result(&server, &id);
    assert!(done["replica"].as_str().is_some(), "{done}");
}

#[test]
fn a_replica_that_cannot_start_leaves_its_core_to_other_apps_between_tries() {
    let server = Server::start("failing-frees", &["--cpus", "1"]);
    let config = "[runtime]\ncpu = 1\n";
    server.deploy_guest("broken", "guest-badinit", Some(config));
    server.wait_status("broken", "a failed start", LONG, |s| s["replicas"][0]["failed_starts"].as_u64() >= Some(1));
    // The only core is the broken replica's only while it tries to start.
    server.deploy_guest("hello", "hello", Some(config));
    server.wait_status("hello", "hello's replica", LONG, |s| ready_pids(s).len() == 1);
    let (status, body) = server.invoke_json("hello", r#"{"name":"Bo"}"#);
    assert_eq!(status, 200, "{body}");
    let status = server.wait_status("broken", "the broken replica to wait for the core", LONG, |s| {
        s["replicas"][0]["state"] == "pending"
    });
    let replica = &status["replicas"][0];
    assert!(replica["pending_reason"].as_str().unwrap_or_default().contains("waiting for 1 core;"), "{status}");
    assert_eq!(replica["failing"], true, "still known to fail: {status}");
    assert!(replica["last_error"].as_str().unwrap_or_default().contains("model file missing"), "{status}");
    // A call says both what it waits for and that the app fails to start.
    let (status, body) = server.invoke_json("broken", "{}");
    assert_eq!((status, error_code(&body)), (503, "NO_CAPACITY"), "{body}");
    let message = error_message(&body);
    assert!(message.contains("held now by hello (1 replica)") && message.contains("model file missing"), "{body}");
}

#[test]
fn warmup_starts_a_replica_now() {
    let server = Server::start("warmup", &["--cpus", "2"]);
    let config = "[runtime]\ncpu = 1.5\n[autoscaler]\nkind = \"queue_depth\"\nmax_replicas = 2\nmin_replicas = 0\n\
                  keep_warm = \"60s\"\n";
    server.deploy_guest("hello", "hello", Some(config));
    assert_eq!(live_replicas(&server.status("hello")), 0);
    let warmup = |name: &str| -> Value {
        server.http.post(server.url(&format!("/v1/apps/{name}/warmup"))).send().unwrap().json().unwrap()
    };
    let response = warmup("hello");
    assert_eq!(response["started"], true, "{response}");
    server.wait_status("hello", "the warmed replica", LONG, |s| ready_pids(s).len() == 1);
    let metrics = server.http.get(server.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains(r#"beamlet_scale_events_total{app="hello",direction="up"} 1"#), "{metrics}");
    // A second would only wait for cores the first holds: not started, and why.
    let response = warmup("hello");
    assert_eq!(response["started"], false, "{response}");
    let reason = response["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("no room on this node: waiting for 1.5 cores;"), "{response}");
    assert_eq!(live_replicas(&server.status("hello")), 1, "no pending replica was left behind");
    server.deploy_guest("tiny", "hello", Some("[runtime]\ncpu = 0.25\n"));
    server.wait_status("tiny", "its one replica", LONG, |s| ready_pids(s).len() == 1);
    let response = warmup("tiny");
    assert_eq!(response["started"], false, "{response}");
    assert_eq!(response["reason"], "the app has 1 of its at most 1 replicas (max_replicas) already", "{response}");
    let response = server.http.post(server.url("/v1/apps/nope/warmup")).send().unwrap();
    assert_eq!(response.status(), 404);
}

#[test]
fn long_tasks_after_tiny_ones_are_not_held_back_on_one_replica_while_another_idles() {
    let server = Server::start("held-back", &[]);
    let config = "[runtime]\nworkers = 1\n[autoscaler]\nmin_replicas = 2\n";
    server.deploy_guest("sleep", "sleep", Some(config));
    server.wait_status("sleep", "two ready replicas", LONG, |s| ready_pids(s).len() == 2);
    // Tiny tasks first: the replicas' pace says runs may be sent ahead.
    for _ in 0..30 {
        assert_eq!(server.invoke_json("sleep", r#"{"ms": 0}"#).0, 200);
    }
    let ids: Vec<String> = (0..4).map(|_| submit(&server, "sleep", r#"{"ms": 1500}"#)).collect();
    let mut per_replica = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        *per_replica.entry(result(&server, id)["replica"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    // One running and at most one waiting per replica: two each, not three
    // behind one worker while the other replica had nothing to do.
    assert_eq!(per_replica.values().copied().collect::<Vec<_>>(), vec![2, 2], "{per_replica:?}");
}

#[test]
fn long_tasks_held_by_an_only_replica_are_taken_back_for_a_new_one() {
    let server = Server::start("recall", &[]);
    let config = "[runtime]\nworkers = 1\n[autoscaler]\nkind = \"queue_depth\"\nmax_tasks_per_replica = 2\n\
                  min_replicas = 1\nmax_replicas = 2\nkeep_warm = \"60s\"\n";
    server.deploy_guest("sleep", "sleep", Some(config));
    server.wait_status("sleep", "the minimum replica", LONG, |s| ready_pids(s).len() == 1);
    // Tiny tasks first: the only replica is sent several runs ahead.
    for _ in 0..30 {
        assert_eq!(server.invoke_json("sleep", r#"{"ms": 0}"#).0, 200);
    }
    // The replica takes all four at once; the runs it holds go back to the
    // queue once the first has run a while, and the replica the autoscaler
    // adds for them takes its share.
    let ids: Vec<String> = (0..4).map(|_| submit(&server, "sleep", r#"{"ms": 3000}"#)).collect();
    let mut per_replica = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        *per_replica.entry(result(&server, id)["replica"].as_str().unwrap().to_owned()).or_default() += 1;
        let record = server.get(&format!("/v1/tasks/{id}"));
        assert_eq!(record["attempts"], 1, "a run taken back is not an attempt: {record}");
    }
    assert_eq!(per_replica.len(), 2, "both replicas ran some: {per_replica:?}");
}

#[test]
fn request_latency_scales_for_long_tasks_after_tiny_ones_before_they_end() {
    let server = Server::start("latency-burst", &[]);
    let config = "[runtime]\nworkers = 1\n[autoscaler]\nkind = \"request_latency\"\ndesired_latency = \"1s\"\n\
                  max_replicas = 4\nmin_replicas = 1\nkeep_warm = \"60s\"\n";
    server.deploy_guest("sleep", "sleep", Some(config));
    server.wait_status("sleep", "the minimum replica", LONG, |s| ready_pids(s).len() == 1);
    // Tiny tasks first: the recent average says one replica is plenty.
    for _ in 0..30 {
        assert_eq!(server.invoke_json("sleep", r#"{"ms": 0}"#).0, 200);
    }
    // The runs in progress outgrow that average: more replicas start for
    // the tasks still queued, before the first long one ends.
    let ids: Vec<String> = (0..4).map(|_| submit(&server, "sleep", r#"{"ms": 3000}"#)).collect();
    let replicas: BTreeSet<String> =
        ids.iter().map(|id| result(&server, id)["replica"].as_str().unwrap().to_owned()).collect();
    assert!(replicas.len() >= 2, "the long tasks ran on more than one replica: {replicas:?}");
}

#[test]
fn freed_room_goes_first_to_a_pending_replica_whose_app_has_tasks_waiting() {
    let server = Server::start("placement-order", &["--cpus", "1"]);
    let one_core = Some("[runtime]\ncpu = 1\n");
    server.deploy_guest("holder", "hello", one_core);
    server.wait_status("holder", "holder's replica", LONG, |s| ready_pids(s).len() == 1);
    // Three fixed pools wait for the core, deployed one after the other.
    for app in ["older", "busy", "newer"] {
        server.deploy_guest(app, "sleep", one_core);
        server.wait_status(app, "a pending replica", LONG, |s| s["replicas"][0]["state"] == "pending");
    }
    let id = submit(&server, "busy", r#"{"ms": 1}"#);
    let status = server.status("older");
    let reason = status["replicas"][0]["pending_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("waiting for 1 core;"), "{status}");
    assert_eq!(server.http.delete(server.url("/v1/apps/holder")).send().unwrap().status(), 200);
    let task = server.get(&format!("/v1/tasks/{id}?wait=60s"));
    assert_eq!(task["status"], "COMPLETE", "{task}");
    for app in ["older", "newer"] {
        let status = server.status(app);
        assert_eq!(status["replicas"][0]["state"], "pending", "the core went to busy's replica: {status}");
        let reason = status["replicas"][0]["pending_reason"].as_str().unwrap_or_default();
        assert!(reason.contains("waiting for 1 core;"), "{status}");
    }
}

#[test]
fn a_burst_of_calls_to_cold_apps_on_a_full_node_takes_turns_on_its_core() {
    let server = Server::start("turns-burst", &["--cpus", "1"]);
    let config = "[runtime]\ncpu = 1\n[autoscaler]\nkind = \"request_latency\"\nmin_replicas = 0\nkeep_warm = \"1h\"\n";
    let apps = ["warm", "cold-a", "cold-b", "cold-c"];
    for app in apps {
        server.deploy_guest(app, "hello", Some(config));
    }
    // One app's idle replica, kept warm for an hour, holds the only core.
    assert_eq!(server.invoke_json("warm", r#"{"name":"w"}"#).0, 200);
    // Each idle replica gives its core up as the next app's call waits for it.
    let calls: Vec<_> = apps[1..]
        .iter()
        .map(|app| {
            let (http, url) = (server.http.clone(), server.url(&format!("/v1/apps/{app}/invoke")));
            std::thread::spawn(move || {
                let response = http.post(url).body(r#"{"name":"c"}"#).send().unwrap();
                (response.status().as_u16(), response.text().unwrap())
            })
        })
        .collect();
    for (app, call) in apps[1..].iter().zip(calls) {
        let (status, body) = call.join().unwrap();
        assert_eq!(status, 200, "{app}: {body}");
    }
}

#[test]
fn on_a_restart_apps_with_tasks_waiting_get_the_room_first() {
    let server = Server::start("restart-order", &["--cpus", "1"]);
    let one_core = Some("[runtime]\ncpu = 1\n");
    server.deploy_guest("a-first", "hello", one_core);
    server.wait_status("a-first", "its replica", LONG, |s| ready_pids(s).len() == 1);
    server.deploy_guest("b-busy", "sleep", one_core);
    let id = submit(&server, "b-busy", r#"{"ms": 1}"#);
    let dir = server.kill();
    // Restored in name order, a-first would take the core again.
    let server = Server::start_in(dir, &["--cpus", "1"]);
    let task = server.get(&format!("/v1/tasks/{id}?wait=60s"));
    assert_eq!(task["status"], "COMPLETE", "{task}");
    let status = server.status("a-first");
    assert_eq!(status["replicas"][0]["state"], "pending", "{status}");
}
