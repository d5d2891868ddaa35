//! GPU apps on the CPU backend (`serve --gpu-backend cpu`): the same host
//! interface and checks a CUDA replica has, exclusive placement, quotas and
//! the deploy check. (The CUDA side is tested in host-gpu/tests/cuda.rs and
//! by scripts/bench-gpu on a machine with a GPU.)

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const LONG: Duration = Duration::from_secs(60);

fn call(server: &Server, app: &str, input: &str) -> Value {
    let (status, body) = server.invoke_json(app, input);
    assert_eq!(status, 200, "{input}: {body}");
    body
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or_default()
}

#[test]
fn a_guest_gets_the_gpu_through_checked_handles_and_a_quota() {
    let server = Server::start("gpu", &["--gpu-backend", "cpu", "--gpus", "1", "--cpu-gpu-memory", "1Gi"]);
    // A GPU component deployed without a GPU in its config is warned about.
    let warned = server.deploy_guest("gpu", "guest-gpu", None);
    let warning = warned["warnings"][0].as_str().unwrap_or_default();
    assert!(warning.contains("imports beamlet:function/gpu") && warning.contains(r#"gpu = "any""#), "{warned}");
    let config = "[runtime]\nworkers = 1\ngpu = \"any\"\ngpu_memory = \"64Mi\"\n[task_queue]\nretries = 0\n";
    let deployed = server.deploy_guest("gpu", "guest-gpu", Some(config));
    assert_eq!(deployed["warnings"].as_array().map(Vec::len), Some(0), "{deployed}");

    let info = call(&server, "gpu", r#"{"mode":"info"}"#);
    assert_eq!((info["backend"].as_str(), info["quota"].as_u64()), (Some("cpu"), Some(64 << 20)), "{info}");
    assert_eq!(info["memory"].as_u64(), Some(1 << 30));
    let status = server.status("gpu");
    assert_eq!(status["replicas"][0]["gpu"], "0: cpu-backend-0", "status names the GPU the replica holds: {status}");
    assert_eq!(call(&server, "gpu", r#"{"mode":"gemm"}"#)["c"], serde_json::json!([2.0, 4.0, 6.0, 8.0]));

    // Every bad call is an error value for the guest, never a crash.
    let over = call(&server, "gpu", r#"{"mode":"alloc","bytes":134217728}"#);
    assert_eq!(error_of(&over), "QuotaExceeded", "{over}");
    assert_eq!(error_of(&call(&server, "gpu", r#"{"mode":"oob"}"#)), "OutOfBounds");
    assert_eq!(error_of(&call(&server, "gpu", r#"{"mode":"gemm-mismatch"}"#)), "InvalidArgument");
    let kernel = call(&server, "gpu", r#"{"mode":"kernel"}"#);
    assert_eq!(error_of(&kernel), "Unavailable", "custom kernels need CUDA: {kernel}");

    // The quota holds across tasks of one instance...
    let held = call(&server, "gpu", r#"{"mode":"hold","bytes":50331648}"#);
    assert_eq!(held["used"].as_u64(), Some(48 << 20), "{held}");
    let metrics = server.http.get(server.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains(r#"beamlet_gpu_memory_used_bytes{app="gpu"} 50331648"#), "{metrics}");
    assert!(metrics.contains(r#"beamlet_gpus{app="gpu"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"beamlet_gpu_held{gpu="0",name="cpu-backend-0"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"beamlet_gpu_memory_bytes{gpu="0",name="cpu-backend-0"} 1073741824"#), "{metrics}");
    assert!(!metrics.contains("beamlet_gpu_utilization_percent{"), "NVML does not sample CPU-backed GPUs: {metrics}");
    assert_eq!(error_of(&call(&server, "gpu", r#"{"mode":"alloc","bytes":33554432}"#)), "QuotaExceeded");
    // ...and a trap frees what the instance held: the next instance starts at zero.
    let (status, body) = server.invoke_json("gpu", r#"{"mode":"hold-then-trap","bytes":8388608}"#);
    assert_eq!((status, error_code(&body)), (500, "GUEST_TRAP"), "{body}");
    assert_eq!(call(&server, "gpu", r#"{"mode":"info"}"#)["used"].as_u64(), Some(0));
    assert_eq!(call(&server, "gpu", r#"{"mode":"alloc","bytes":33554432}"#)["len"].as_u64(), Some(8 << 20));

    // An app without `gpu` gets `unavailable`, saying why.
    server.deploy_guest("cpu-only", "guest-gpu", None);
    let body = call(&server, "cpu-only", r#"{"mode":"info"}"#);
    assert_eq!(error_of(&body), "Unavailable");
    assert!(body["message"].as_str().unwrap_or_default().contains("has no GPU"), "{body}");

    // Deploy refuses workers * gpu_memory larger than the GPU.
    let config = "[runtime]\nworkers = 4\ngpu = \"any\"\ngpu_memory = \"512Mi\"\n";
    let response = server.deploy("big", &std::fs::read(wasm("guest-gpu")).unwrap(), Some(config));
    assert_eq!(response.status(), 400);
    let body: Value = response.json().unwrap();
    assert_eq!(error_code(&body), "BAD_CONFIG");
    assert!(error_message(&body).contains("workers * gpu_memory"), "{body}");
    // ...and a model this node does not have: its replicas would wait forever.
    let response =
        server.deploy("h100", &std::fs::read(wasm("guest-gpu")).unwrap(), Some("[runtime]\ngpu = \"H100\"\n"));
    let body: Value = response.json().unwrap();
    assert_eq!(error_code(&body), "BAD_CONFIG", "{body}");
    assert!(error_message(&body).contains("matches none of this node's GPUs (cpu-backend-0)"), "{body}");
    // And a GPU asked for by a component that never calls it.
    let response =
        server.deploy("idle-gpu", &std::fs::read(wasm("hello")).unwrap(), Some("[runtime]\ngpu = \"any\"\n"));
    let body: Value = response.json().unwrap();
    let warnings: Vec<&str> = body["warnings"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    assert!(warnings.iter().any(|w| w.contains("never calls it") && w.contains("remove gpu")), "{body}");
    assert!(warnings.iter().any(|w| w.contains("waiting for a free GPU")), "the only GPU is held: {body}");
    assert_eq!(server.http.delete(server.url("/v1/apps/idle-gpu")).send().unwrap().status(), 200);

    // One GPU, one replica: a second GPU app waits for it, then runs.
    let config = "[runtime]\ngpu = \"any\"\ngpu_memory = \"64Mi\"\n";
    server.deploy_guest("second", "guest-gpu", Some(config));
    let status = server.wait_status("second", "a pending replica", LONG, |s| s["replicas"][0]["state"] == "pending");
    let reason = status["replicas"][0]["pending_reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("waiting for a free GPU"), "exclusive: {status}");
    let apps = server.get("/v1/apps");
    let second = apps["apps"].as_array().unwrap().iter().find(|app| app["name"] == "second").unwrap();
    assert_eq!((second["replicas"].as_u64(), second["pending_replicas"].as_u64()), (Some(0), Some(1)), "{apps}");
    let (status, body) = server.invoke_json("second", r#"{"mode":"info"}"#);
    assert_eq!((status, error_code(&body)), (503, "NO_CAPACITY"), "{body}");
    let id = submit(&server, "second", r#"{"mode":"info"}"#);
    assert_eq!(server.http.delete(server.url("/v1/apps/gpu")).send().unwrap().status(), 200);
    assert_eq!(result(&server, &id)["backend"], "cpu", "it ran once the GPU was free");
}

#[test]
fn the_gpu_mlp_example_matches_its_cpu_reference() {
    let server = Server::start("gpu-mlp", &["--gpu-backend", "cpu"]);
    let config = std::fs::read_to_string(examples().join("gpu-mlp").join("beamlet.toml")).unwrap();
    server.deploy_guest("mlp", "gpu-mlp", Some(&config));
    for seed in [1, 2, 42] {
        let gpu = call(&server, "mlp", &format!(r#"{{"seed": {seed}}}"#));
        let reference = call(&server, "mlp", &format!(r#"{{"seed": {seed}, "reference": true}}"#));
        assert_eq!(gpu["backend"], "cpu");
        let (gpu, reference) = (gpu["output"].as_array().unwrap(), reference["output"].as_array().unwrap());
        assert_eq!(gpu.len(), 10);
        let sum: f64 = gpu.iter().map(|p| p.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-4, "probabilities sum to 1: {sum}");
        for (g, r) in gpu.iter().zip(reference) {
            assert!((g.as_f64().unwrap() - r.as_f64().unwrap()).abs() < 1e-4, "{gpu:?} vs {reference:?}");
        }
    }
    let (status, body) = server.invoke_json("mlp", r#"{"input": [1, 2, 3]}"#);
    assert_eq!((status, error_code(&body)), (400, "BAD_INPUT"), "{body}");
    // Refused for its size before a sample is made (a million would take 256 MB).
    let many = format!(r#"{{"seeds": [0{}]}}"#, ",0".repeat(999_999));
    let (status, body) = server.invoke_json("mlp", &many);
    assert_eq!((status, error_code(&body)), (400, "BAD_INPUT"), "{body}");
    assert!(error_message(&body).contains("a batch holds 1 to 1024 samples, not 1000000"), "{body}");
}

#[test]
fn a_scale_to_zero_app_that_cannot_start_gives_its_gpu_back() {
    let server = Server::start("gpu-failing", &["--gpu-backend", "cpu", "--gpus", "1"]);
    let config = "[runtime]\ngpu = \"any\"\n[autoscaler]\nkind = \"queue_depth\"\nmax_tasks_per_replica = 1\n";
    server.deploy_guest("broken", "guest-badinit", Some(config));
    let (status, body) = server.invoke_json("broken", "{}");
    assert_eq!((status, error_code(&body)), (503, "START_FAILED"), "{body}");
    // Nothing left to run: its crash-looping replica is surplus and stops,
    // freeing the only GPU for another app.
    server.wait_status("broken", "the failing replica to stop", LONG, |s| {
        s["replicas"].as_array().is_some_and(Vec::is_empty)
    });
    server.deploy_guest("healthy", "guest-gpu", Some("[runtime]\ngpu = \"any\"\ngpu_memory = \"64Mi\"\n"));
    assert_eq!(call(&server, "healthy", r#"{"mode":"info"}"#)["backend"], "cpu");
}

#[test]
fn an_idle_replica_kept_warm_gives_its_gpu_to_another_apps_call() {
    let server = Server::start("gpu-yield", &["--gpu-backend", "cpu", "--gpus", "1"]);
    let config = "[runtime]\ngpu = \"any\"\ngpu_memory = \"64Mi\"\n[autoscaler]\nkind = \"queue_depth\"\n\
                  max_tasks_per_replica = 1\nmax_replicas = 1\nkeep_warm = \"1h\"\n";
    server.deploy_guest("first", "guest-gpu", Some(config));
    assert_eq!(call(&server, "first", r#"{"mode":"info"}"#)["backend"], "cpu");
    // Its replica, idle, holds the GPU but would give it: no "no room" warning.
    let deployed = server.deploy_guest("second", "guest-gpu", Some(config));
    assert_eq!(deployed["warnings"], serde_json::json!([]), "{deployed}");
    // Each call finds the only GPU held by the other app's idle replica,
    // kept warm for an hour: it stops for the call instead.
    for app in ["second", "first", "second"] {
        assert_eq!(call(&server, app, r#"{"mode":"info"}"#)["backend"], "cpu", "{app}");
    }
    assert!(server.log().contains("its room wanted by app first"), "{}", server.log());
    assert!(server.status("first")["replicas"].as_array().is_some_and(Vec::is_empty));
}

#[test]
fn a_replica_whose_gpu_work_outlives_its_task_exits_and_says_why() {
    let server = Server::start("gpu-stuck", &["--gpu-backend", "cpu", "--gpus", "1"]);
    let config = "[runtime]\nworkers = 1\ngpu = \"any\"\ntimeout = \"1s\"\n[task_queue]\nretries = 0\n";
    server.deploy_guest("stuck", "guest-gpu", Some(config));
    // One GEMM that takes the CPU backend many seconds: it outlives the task's timeout.
    let (status, body) = server.invoke_json("stuck", r#"{"mode":"busy","n":8192,"iters":1}"#);
    assert_eq!((status, error_code(&body)), (504, "TIMEOUT"), "{body}");
    let status = server.wait_status("stuck", "the replica to be replaced", LONG, |s| {
        s["replicas"][0]["last_error"].as_str().is_some_and(|e| e.contains("GPU work of a stopped task"))
    });
    let error = status["replicas"][0]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("it exited as it said it would"), "{error}");
    let logs = server.get("/v1/apps/stuck/logs");
    assert!(logs.to_string().contains("GPU work of a stopped task"), "{logs}");
}

#[test]
fn warmup_of_an_app_whose_replica_waits_for_the_gpu_says_so() {
    let server = Server::start("gpu-warmup", &["--gpu-backend", "cpu", "--gpus", "1"]);
    let config = "[runtime]\ngpu = \"any\"\ngpu_memory = \"64Mi\"\n";
    server.deploy_guest("holder", "guest-gpu", Some(config));
    server.wait_status("holder", "its replica to hold the GPU", LONG, |s| s["replicas"][0]["state"] == "ready");
    server.deploy_guest("waiter", "guest-gpu", Some(config));
    server.wait_status("waiter", "its replica to wait", LONG, |s| s["replicas"][0]["state"] == "pending");
    let warmup: Value = server.http.post(server.url("/v1/apps/waiter/warmup")).send().unwrap().json().unwrap();
    assert_eq!(warmup["started"], false, "{warmup}");
    let reason = warmup["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("one is pending: waiting for a free GPU"), "{reason}");
    assert!(reason.contains("held now by holder (1 replica)"), "{reason}");
}

#[test]
fn a_cancelled_task_stops_waiting_on_the_gpu_and_its_queued_work_is_dropped() {
    let server = Server::start("gpu-cancel", &["--gpu-backend", "cpu", "--gpus", "1"]);
    let config = "[runtime]\nworkers = 1\ngpu = \"any\"\ntimeout = \"300s\"\n";
    server.deploy_guest("busy", "guest-gpu", Some(config));
    // Hours of GEMMs for the CPU backend, queued at once, then waited on.
    let id = submit(&server, "busy", r#"{"mode":"busy","n":1024,"iters":100000}"#);
    wait_for("the task to run", LONG, || (server.get(&format!("/v1/tasks/{id}"))["status"] == "RUNNING").then_some(()));
    std::thread::sleep(Duration::from_millis(500));
    let cancelled = server.http.delete(server.url(&format!("/v1/tasks/{id}"))).send().unwrap();
    assert_eq!(cancelled.status(), 200);

    // The only worker is free again long before the task's timeout: the
    // wait ended with the cancel and the GEMMs not begun were dropped, so
    // the replica did not have to be replaced to free its GPU.
    let next = submit(&server, "busy", r#"{"mode":"info"}"#);
    let record = server.get(&format!("/v1/tasks/{next}?wait=60s"));
    assert_eq!((record["status"].as_str(), record["attempts"].as_u64()), (Some("COMPLETE"), Some(1)), "{record}");
    let status = server.status("busy");
    assert_eq!(status["replicas"][0]["restarts"], 0, "{status}");
}
