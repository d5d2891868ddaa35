//! Several nodes on one Redis (`serve --redis`): apps deployed once run
//! everywhere, any node takes calls and tasks, and a node that dies loses
//! none of the tasks it was running.

use std::time::Duration;

use serde_json::Value;

use crate::redis_server::TestRedis as Redis;
use crate::support::*;

fn node(name: &str, redis: &Redis) -> Server {
    Server::start(name, &["--redis", &redis.url])
}

fn knows(server: &Server, app: &str) -> bool {
    server.http.get(server.url(&format!("/v1/apps/{app}"))).send().unwrap().status() == 200
}

/// Deploys guest `app` (as app `app`) through `a` and waits until `b` has it.
fn deploy_to_both(a: &Server, b: &Server, app: &str, config: Option<&str>) {
    a.deploy_guest(app, app, config);
    wait_for("node b to learn of the app", Duration::from_secs(60), || knows(b, app).then_some(()));
}

#[test]
fn nodes_on_one_redis_share_apps_calls_and_tasks() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = (node("cluster-a", &redis), node("cluster-b", &redis));
    deploy_to_both(&a, &b, "hello", None);

    let (status, body) = b.invoke_json("hello", r#"{"name":"Bo"}"#);
    assert_eq!((status, body["message"].as_str()), (200, Some("Hello, Bo!")), "{body}");
    // Tasks taken by one node are seen, and waited on, from the other.
    let ids: Vec<String> = (0..10).map(|i| submit(&b, "hello", &format!(r#"{{"name":"t{i}"}}"#))).collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(result(&a, id)["message"], format!("Hello, t{i}!"));
    }
    let listed = a.get("/v1/apps/hello/tasks?status=COMPLETE");
    assert_eq!(listed["tasks"].as_array().map(Vec::len), Some(10), "{listed}");
    let page = a.get("/v1/apps/hello/tasks?status=COMPLETE&limit=6");
    let rest = a.get(&format!("/v1/apps/hello/tasks?status=COMPLETE&before={}", page["next"].as_str().unwrap()));
    let ids = |list: &Value| list["tasks"].as_array().unwrap().iter().map(|t| t["id"].clone()).collect::<Vec<_>>();
    assert_eq!([ids(&page), ids(&rest)].concat(), ids(&listed), "two pages, the same tasks in the same order");
    // One replica in all for a fixed pool of one, whichever node runs it.
    wait_for("one replica in the cluster", Duration::from_secs(60), || {
        (a.ready_pids("hello").len() + b.ready_pids("hello").len() == 1).then_some(())
    });

    // Versions count on across nodes, whichever a deploy goes through, and
    // however soon after the last one (the node need not have synced yet).
    assert_eq!(b.deploy_guest("hello", "hello", None)["version"], 2);
    assert_eq!(a.deploy_guest("hello", "hello", None)["version"], 3);
    wait_for("both nodes on version 3", Duration::from_secs(60), || {
        [&a, &b].iter().all(|node| node.get("/v1/apps/hello")["version"] == 3).then_some(())
    });

    let removed = b.http.delete(b.url("/v1/apps/hello")).send().unwrap();
    assert_eq!(removed.status(), 200);
    wait_for("node a to drop the app", Duration::from_secs(60), || (!knows(&a, "hello")).then_some(()));
    let (status, body) = a.invoke_json("hello", "{}");
    assert_eq!((status, error_code(&body)), (404, "UNKNOWN_APP"), "{body}");
}

#[test]
fn tasks_of_a_node_that_dies_are_run_by_another() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = (node("cluster-kill-a", &redis), node("cluster-kill-b", &redis));
    deploy_to_both(&a, &b, "sleep", Some("[runtime]\nworkers = 4\n"));
    // The fixed pool of one settles on one node; the tasks run there.
    let running_on_a = wait_for("the pool to settle on one node", Duration::from_secs(60), || {
        match (a.ready_pids("sleep").len(), b.ready_pids("sleep").len()) {
            (1, 0) => Some(true),
            (0, 1) => Some(false),
            _ => None,
        }
    });
    let (doomed, survivor) = if running_on_a { (a, b) } else { (b, a) };
    let ids: Vec<String> = (0..4).map(|_| submit(&survivor, "sleep", r#"{"ms":3000}"#)).collect();
    wait_for("the tasks to run on the doomed node", Duration::from_secs(60), || {
        (doomed.status("sleep")["queue"]["running"] == 4).then_some(())
    });
    let dir = doomed.kill();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(dir.with_extension("log"));

    let mut retried = 0;
    for id in &ids {
        let record: Value = survivor.get(&format!("/v1/tasks/{id}?wait=90s"));
        assert_eq!(record["status"], "COMPLETE", "{record}");
        // 2: it was running when the node died. 1: it was sent ahead to a
        // busy worker there and never started, so no attempt was spent.
        let attempts = record["attempts"].as_u64().unwrap();
        assert!(matches!(attempts, 1 | 2), "{record}");
        retried += usize::from(attempts == 2);
    }
    assert!(retried > 0, "tasks were running on the node that died");
    assert!(survivor.log().contains("a node left or stopped beating"), "{}", survivor.log());
}

#[test]
fn a_gpu_app_called_on_a_node_without_a_gpu_runs_on_the_node_with_one() {
    let Some(redis) = Redis::start() else { return };
    let gpu = Server::start("cluster-gpu", &["--redis", &redis.url, "--gpu-backend", "cpu", "--gpus", "1"]);
    let plain = node("cluster-plain", &redis);
    let config = std::fs::read_to_string(examples().join("gpu-mlp").join("beamlet.toml")).unwrap();
    // Deployed through the node without a GPU: the other one can run it.
    plain.deploy_guest("mlp", "gpu-mlp", Some(&config));
    wait_for("the GPU node to learn of the app", Duration::from_secs(60), || knows(&gpu, "mlp").then_some(()));
    let h100 = config.replace(r#"gpu = "any""#, r#"gpu = "H100""#);
    let refused = plain.deploy("mlp2", &std::fs::read(wasm("gpu-mlp")).unwrap(), Some(&h100));
    let body: Value = refused.json().unwrap();
    assert!(error_message(&body).contains("; nor can any other node of the cluster run it"), "{body}");
    // The GPU node's own reason, which says what to change.
    assert!(error_message(&body).contains(r#"gpu = "H100" matches none of this node's GPUs"#), "{body}");
    let (status, body) = plain.invoke_json("mlp", r#"{"seed": 1}"#);
    assert_eq!((status, body["backend"].as_str()), (200, Some("cpu")), "{body}");
    assert!(plain.status("mlp")["replicas"].as_array().is_some_and(Vec::is_empty), "no replica where no GPU is");
    let warmup: Value = plain.http.post(plain.url("/v1/apps/mlp/warmup")).send().unwrap().json().unwrap();
    assert_eq!(warmup["started"], false, "{warmup}");
    assert!(warmup["reason"].as_str().is_some_and(|r| r.contains("this node cannot run its replicas")), "{warmup}");
    // A replica's id says which node runs it.
    let node_id = std::fs::read_to_string(gpu.data_dir.join("node-id")).unwrap();
    let replica = gpu.status("mlp")["replicas"][0]["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(replica.split_once('@').map(|(_, tag)| tag), Some(&node_id.trim()[..8]), "{replica}");
    assert!(plain.log().contains("this node runs no replica of the app"), "{}", plain.log());
}

#[test]
fn a_call_whose_task_redis_lost_is_told_so_and_the_apps_come_back() {
    let Some(redis) = Redis::start() else { return };
    let server = node("cluster-lost", &redis);
    server.deploy_guest("sleep", "sleep", None);
    wait_for("a ready replica", Duration::from_secs(60), || (!server.ready_pids("sleep").is_empty()).then_some(()));
    std::thread::scope(|scope| {
        let call = scope.spawn(|| server.invoke_json("sleep", r#"{"ms":3000}"#));
        wait_for("the call to run", Duration::from_secs(60), || {
            (server.status("sleep")["queue"]["running"] == 1).then_some(())
        });
        // Redis loses everything, as a restart without persistence would.
        let addr = redis.url.trim_start_matches("redis://");
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(&mut conn, b"FLUSHALL\r\n").unwrap();
        let (status, body) = call.join().unwrap();
        assert_eq!((status, error_code(&body)), (503, "STORE_FAILED"), "{body}");
        assert!(error_message(&body).contains("lost task"), "{body}");
    });
    // The node shares its apps again; calls work.
    wait_for("the app to be served again", Duration::from_secs(60), || {
        let (status, body) = server.invoke_json("sleep", r#"{"ms":1}"#);
        (status == 200).then_some(body)
    });
}

#[test]
fn an_app_deleted_while_a_node_was_away_stays_deleted_when_it_returns() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = (node("cluster-away-a", &redis), node("cluster-away-b", &redis));
    deploy_to_both(&a, &b, "hello", None);
    let b_dir = b.terminate();
    assert_eq!(a.http.delete(a.url("/v1/apps/hello")).send().unwrap().status(), 200);
    let b = Server::start_in(b_dir, &["--redis", &redis.url]);
    assert!(!knows(&b, "hello"), "dropped on return, not shared again:\n{}", b.log());
    assert!(!knows(&a, "hello"));
    assert!(b.log().contains("deleted from the cluster while this node was away"), "{}", b.log());
}

#[test]
fn a_node_stopped_while_redis_is_down_saves_its_runs_ends_once_redis_answers() {
    let Some(mut redis) = Redis::start() else { return };
    let server = node("cluster-save", &redis);
    server.deploy_guest("sleep", "sleep", Some("[task_queue]\nretries = 0\n"));
    let id = submit(&server, "sleep", r#"{"ms":3000}"#);
    wait_for("the task to run", Duration::from_secs(60), || {
        (server.get(&format!("/v1/tasks/{id}"))["status"] == "RUNNING").then_some(())
    });
    let ready = || server.http.get(server.url("/readyz")).send().unwrap();
    assert_eq!(ready().status(), 200);
    redis.stop();
    // Alive, but not ready: a load balancer sends its calls elsewhere.
    wait_for("the node to say it is not ready", Duration::from_secs(30), || (ready().status() == 503).then_some(()));
    let body: Value = ready().json().unwrap();
    assert_eq!(error_code(&body), "STORE_FAILED", "{body}");
    assert_eq!(server.http.get(server.url("/healthz")).send().unwrap().status(), 200);
    server.sigterm();
    // The run ends while Redis is down; the node waits for Redis to save it.
    wait_for("the node to wait for Redis", Duration::from_secs(60), || {
        server.log().contains("waiting for Redis to save the ends of 1 runs").then_some(())
    });
    redis.restart();
    let log = {
        let data_dir = server.wait_exit();
        std::fs::read_to_string(data_dir.with_extension("log")).unwrap_or_default()
    };
    assert!(log.contains("saved the ends of the runs Redis missed"), "{log}");
    let other = node("cluster-save-b", &redis);
    let record = other.get(&format!("/v1/tasks/{id}?wait=30s"));
    assert_eq!((record["status"].as_str(), record["attempts"].as_u64()), (Some("COMPLETE"), Some(1)), "{record}");
}

#[test]
fn while_redis_is_down_no_node_starts_replicas_that_other_nodes_run() {
    let Some(mut redis) = Redis::start() else { return };
    let (a, b) = (node("cluster-outage-a", &redis), node("cluster-outage-b", &redis));
    deploy_to_both(&a, &b, "hello", None);
    // The fixed pool of one settles on one node.
    let on_a = wait_for("the pool to settle on one node", Duration::from_secs(60), || {
        match (a.ready_pids("hello").len(), b.ready_pids("hello").len()) {
            (1, 0) => Some(true),
            (0, 1) => Some(false),
            _ => None,
        }
    });
    let other = if on_a { &b } else { &a };
    redis.stop();
    wait_for("the other node to miss Redis", Duration::from_secs(30), || {
        other.log().contains("failed to read other nodes' replicas").then_some(())
    });
    // Two more ticks of its autoscaler: it starts no replica of its own.
    std::thread::sleep(Duration::from_secs(2));
    let metrics = other.http.get(other.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains(r#"beamlet_replicas{app="hello",state="ready"} 0"#), "{metrics}");
    assert!(!metrics.contains(r#"beamlet_replicas{app="hello",state="starting"} 1"#), "{metrics}");
    redis.restart();
    wait_for("calls again", Duration::from_secs(60), || {
        (other.invoke_json("hello", r#"{"name":"Ada"}"#).0 == 200).then_some(())
    });
}

#[test]
fn a_node_whose_redis_stops_answering_still_answers_its_health_checks() {
    let Some(redis) = Redis::start() else { return };
    let server = Server::start("cluster-frozen", &["--redis", &redis.url, "--shutdown-grace", "2s"]);
    server.deploy_guest("hello", "hello", None);
    assert_eq!(server.invoke_json("hello", r#"{"name":"Ada"}"#).0, 200);
    redis.freeze();
    // More calls than the node has threads, each waiting on Redis.
    let calls: Vec<_> = (0..16)
        .map(|_| {
            let (http, url) = (server.http.clone(), server.url("/v1/apps/hello/invoke"));
            std::thread::spawn(move || http.post(url).body(r#"{"name":"Ada"}"#).send().map(|r| r.status().as_u16()))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let health = server.http.get(server.url("/healthz")).send().unwrap();
    assert_eq!(health.status(), 200);
    // Answered while every call still waits: Redis holds them, not the node.
    assert!(calls.iter().all(|call| !call.is_finished()), "the node answered only once the calls gave up on Redis");
    // Stopped now, it exits within its grace all the same, Redis still frozen.
    server.sigterm();
    let (exited, exit) = std::sync::mpsc::channel();
    std::thread::spawn(move || exited.send(server.wait_exit()));
    // Its grace is 2 s; a node that waits on the frozen Redis instead takes
    // a 10 s Redis timeout per call it makes on the way out (over 20 s).
    let stopped = exit.recv_timeout(Duration::from_secs(15));
    redis.thaw();
    stopped.expect("the node waited for Redis past its grace");
    for call in calls {
        // Refused, or cut off as the node exited.
        if let Ok(status) = call.join().unwrap() {
            assert!(status == 200 || status == 503, "{status}");
        }
    }
    let other = node("cluster-frozen-b", &redis);
    wait_for("the app on another node", Duration::from_secs(60), || {
        (other.invoke_json("hello", r#"{"name":"Ada"}"#).0 == 200).then_some(())
    });
}

#[test]
fn a_stopping_node_answers_its_callers_whose_tasks_run_on_another_node() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = (node("cluster-calls-a", &redis), node("cluster-calls-b", &redis));
    deploy_to_both(&a, &b, "sleep", None);
    // One replica in the cluster (a fixed pool of one): the other node takes the call.
    let (runner, caller) = wait_for("the app's replica", Duration::from_secs(60), || {
        match (a.ready_pids("sleep").is_empty(), b.ready_pids("sleep").is_empty()) {
            (false, true) => Some((&a, &b)),
            (true, false) => Some((&b, &a)),
            _ => None,
        }
    });
    std::thread::scope(|scope| {
        let call = scope.spawn(|| caller.invoke_json("sleep", r#"{"ms":3000}"#));
        wait_for("the call to run", Duration::from_secs(60), || {
            (runner.status("sleep")["queue"]["running"] == 1).then_some(())
        });
        caller.sigterm();
        let (status, body) = call.join().unwrap();
        assert_eq!(status, 200, "the caller got its answer: {body}");
    });
}

#[test]
fn a_call_waiting_when_the_last_node_that_can_run_its_app_dies_is_refused() {
    let Some(redis) = Redis::start() else { return };
    // Only the big node has the cores the app asks for.
    let big = Server::start("cluster-last-big", &["--redis", &redis.url, "--cpus", "4"]);
    let small = Server::start("cluster-last-small", &["--redis", &redis.url, "--cpus", "1"]);
    deploy_to_both(&small, &big, "sleep", Some("[runtime]\ncpu = 2\ntimeout = \"300s\"\n"));
    wait_for("the app's replica on the big node", Duration::from_secs(60), || {
        (!big.ready_pids("sleep").is_empty()).then_some(())
    });
    std::thread::scope(|scope| {
        let call = scope.spawn(|| small.invoke_json("sleep", r#"{"ms":100000}"#));
        wait_for("the call to run", Duration::from_secs(60), || {
            (big.status("sleep")["queue"]["running"] == 1).then_some(())
        });
        let dir = big.kill();
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(dir.with_extension("log"));
        // Answered once the node is seen dead, not when the task's ttl runs out.
        let (status, body) = call.join().unwrap();
        assert_eq!((status, error_code(&body)), (503, "NO_CAPACITY"), "{body}");
        assert!(error_message(&body).contains("no live node of the cluster can run it"), "{body}");
    });
    let id = submit(&small, "sleep", r#"{"ms":1}"#);
    assert_eq!(small.get(&format!("/v1/tasks/{id}"))["status"], "PENDING", "tasks wait for a node that can run them");
}

#[test]
fn a_call_refused_for_want_of_a_gpu_says_which_node_lacks_it() {
    let Some(redis) = Redis::start() else { return };
    let server = Server::start("cluster-gpu-held", &["--redis", &redis.url, "--gpu-backend", "cpu", "--gpus", "1"]);
    let config = "[runtime]\ngpu = \"any\"\ngpu_memory = \"64Mi\"\n";
    let limit = Duration::from_secs(60);
    server.deploy_guest("holder", "guest-gpu", Some(config));
    server.wait_status("holder", "its replica to hold the GPU", limit, |s| s["replicas"][0]["state"] == "ready");
    server.deploy_guest("waiter", "guest-gpu", Some(config));
    server.wait_status("waiter", "its replica to wait", limit, |s| s["replicas"][0]["state"] == "pending");
    let (status, body) = server.invoke_json("waiter", r#"{"mode":"info"}"#);
    assert_eq!((status, error_code(&body)), (503, "NO_CAPACITY"), "{body}");
    // Its caller may be on another node: the message names this one, and
    // the GPU's holder rather than every app's replicas.
    let node_id = std::fs::read_to_string(server.data_dir.join("node-id")).unwrap();
    let message = error_message(&body);
    assert!(message.contains(&format!("node {}'s only one is held by replica", &node_id.trim()[..8])), "{body}");
    assert!(!message.contains("this node") && !message.contains("held now by"), "{body}");
}

#[test]
fn redeploys_under_a_stream_of_short_tasks_lose_none_of_them() {
    let Some(redis) = Redis::start() else { return };
    let server = node("cluster-redeploy-stream", &redis);
    let config = "[runtime]\nworkers = 4\n[task_queue]\nretries = 0\n";
    server.deploy_guest("sleep", "sleep", Some(config));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let ids = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let id = submit(&server, "sleep", r#"{"ms":2}"#);
                    ids.lock().unwrap().push(id);
                }
            });
        }
        // Each new version replaces the replica while runs end back to back
        // on it, the next leased with the end of the last.
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(400));
            server.deploy_guest("sleep", "sleep", Some(config));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let ids = ids.into_inner().unwrap();
    for id in &ids {
        let record: Value = server.get(&format!("/v1/tasks/{id}?wait=60s"));
        assert_eq!((record["status"].as_str(), record["attempts"].as_u64()), (Some("COMPLETE"), Some(1)), "{record}");
    }
    assert!(!server.log().contains("replica connection closed"), "{}", server.log());
}

#[test]
fn a_node_still_taking_on_an_app_deployed_elsewhere_says_so_rather_than_unknown() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = (node("cluster-syncing-a", &redis), node("cluster-syncing-b", &redis));
    // A large component: the other node takes a while to compile it.
    let response = a.deploy("py", &std::fs::read(python_http()).unwrap(), None);
    assert_eq!(response.status(), 201, "{}", response.text().unwrap());
    let first = b.http.get(b.url("/http/py/hello")).send().unwrap();
    let status = first.status().as_u16();
    let body = first.text().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("APP_SYNCING") && body.contains("still taking it on"), "{body}");
    wait_for("node b to serve the app", Duration::from_secs(120), || {
        let response = b.http.get(b.url("/http/py/hello")).send().unwrap();
        let status = response.status().as_u16();
        assert!(status == 200 || status == 503, "{status}: {}", response.text().unwrap());
        (status == 200).then_some(())
    });
}

#[test]
fn metrics_and_app_listings_answer_from_what_redis_last_said_while_it_is_frozen() {
    let Some(redis) = Redis::start() else { return };
    let server = node("cluster-frozen-metrics", &redis);
    let apps = ["m1", "m2", "m3", "m4", "m5"];
    for app in apps {
        server.deploy_guest(app, "hello", None);
    }
    let ready = || server.http.get(server.url("/readyz")).send().unwrap().status();
    redis.freeze();
    wait_for("the node to notice", Duration::from_secs(60), || (ready() == 503).then_some(()));
    // Each app's counts from Redis would take its 10 s timeout: 50 s in all.
    let impatient = http_client().timeout(Duration::from_secs(25)).build().unwrap();
    let metrics = impatient.get(server.url("/metrics")).send().and_then(|r| r.text());
    let listed = impatient.get(server.url("/v1/apps")).send().and_then(|r| r.text());
    redis.thaw();
    let metrics = metrics.expect("/metrics answers while Redis is frozen");
    assert!(metrics.contains(r#"beamlet_queue_depth{app="m5"} 0"#), "{metrics}");
    let listed = listed.expect("the app listing answers while Redis is frozen");
    assert!(apps.iter().all(|app| listed.contains(app)), "{listed}");
}

#[test]
fn replicas_pending_on_several_nodes_start_no_more_than_the_cluster_wants() {
    let Some(redis) = Redis::start() else { return };
    let start = |name| Server::start(name, &["--redis", &redis.url, "--cpus", "1"]);
    let (a, b) = (start("cluster-room-a"), start("cluster-room-b"));
    // A fixed pool of two one-core replicas fills both nodes.
    a.deploy_guest("filler", "hello", Some("[runtime]\ncpu = 1\n[autoscaler]\nmin_replicas = 2\n"));
    wait_for("a filler on each node", Duration::from_secs(60), || {
        (a.ready_pids("filler").len() == 1 && b.ready_pids("filler").len() == 1).then_some(())
    });
    let config = "[runtime]\ncpu = 0.5\n[autoscaler]\nkind = \"queue_depth\"\nmax_tasks_per_replica = 1\n\
                  max_replicas = 2\nmin_replicas = 0\n";
    a.deploy_guest("sleep", "sleep", Some(config));
    wait_for("node b to learn of sleep", Duration::from_secs(60), || knows(&b, "sleep").then_some(()));
    let ids: Vec<String> = (0..4).map(|_| submit(&a, "sleep", r#"{"ms":6000}"#)).collect();
    let states = |node: &Server| -> Vec<String> {
        let status = node.status("sleep");
        let replicas = status["replicas"].as_array().cloned().unwrap_or_default();
        replicas.iter().filter_map(|r| r["state"].as_str().map(str::to_owned)).collect()
    };
    // Neither node has room: both hold pending replicas for the two wanted.
    wait_for("pending replicas on both nodes", Duration::from_secs(60), || {
        [&a, &b].iter().all(|node| states(node).iter().any(|s| s == "pending")).then_some(())
    });
    let removed = b.http.delete(b.url("/v1/apps/filler")).send().unwrap();
    assert_eq!(removed.status(), 200);
    // Room frees on both at once; the cluster runs two, not each node its own.
    let live = |node: &Server| states(node).iter().filter(|s| *s == "starting" || *s == "ready").count();
    let mut most = 0;
    let mut seen = Vec::new();
    wait_for("the tasks to end", Duration::from_secs(90), || {
        let (on_a, on_b) = (live(&a), live(&b));
        most = most.max(on_a + on_b);
        seen.push((on_a, on_b));
        std::thread::sleep(Duration::from_millis(50));
        ids.iter().all(|id| a.get(&format!("/v1/tasks/{id}"))["status"] == "COMPLETE").then_some(())
    });
    seen.dedup();
    assert!(most <= 2, "at most max_replicas = 2 in the cluster, saw {most}: {seen:?}");
    // No replica stays pending where the cluster needs none.
    assert!(seen.iter().any(|(on_a, on_b)| on_a + on_b == 2), "{seen:?}");
    wait_for("no pending replica left", Duration::from_secs(30), || {
        [&a, &b].iter().all(|node| !states(node).iter().any(|s| s == "pending")).then_some(())
    });
}
