//! The CLI's HTTP client for a running node.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::multipart::{Form, Part};
use reqwest::{Response, StatusCode};
use serde_json::Value;

pub(crate) struct Client {
    base: String,
    http: reqwest::Client,
}

const UPLOAD_CHUNK: usize = 64 * 1024;

impl Client {
    pub(crate) fn new(server: &str) -> Result<Self> {
        let base = server.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            bail!("--server {server:?} is not an http:// or https:// URL");
        }
        if let Err(e) = reqwest::Url::parse(&base) {
            bail!("--server {server:?} is not a valid URL: {e}");
        }
        Ok(Self { base, http: http_client().build()? })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Response> {
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        Err(api_error(status, &body))
    }

    fn unreachable(&self, e: &reqwest::Error) -> anyhow::Error {
        let tls = if self.base.starts_with("https://") {
            " A node serves plain HTTP: use http:// unless a TLS proxy stands in front of it."
        } else {
            ""
        };
        anyhow!(
            "could not reach beamlet at {}: {}. Is `beamlet serve` running there? Start it, or point --server (or \
             BEAMLET_SERVER) at it.{tls}",
            self.base,
            describe_http_error(e)
        )
    }

    async fn get_json(&self, url: String) -> Result<Value> {
        let response = self.send(self.http.get(url)).await?;
        self.json(response).await
    }

    /// A JSON answer; anything else means `--server` is not a beamlet node.
    async fn json(&self, response: Response) -> Result<Value> {
        response.json().await.with_context(|| {
            format!("{} did not answer as a beamlet node does; is --server (or BEAMLET_SERVER) right?", self.base)
        })
    }

    /// `{base}/v1/apps/{name}{rest}`, for a valid app name only: the name goes
    /// into the URL as it is, and `a?b` or `..` would reach another endpoint.
    fn app_url(&self, name: &str, rest: &str) -> Result<String> {
        crate::registry::validate_name(name)?;
        Ok(format!("{}/v1/apps/{name}{rest}", self.base))
    }

    /// `{base}/v1/tasks/{id}{rest}`, for what can be a task id only.
    fn task_url(&self, id: &str, rest: &str) -> Result<String> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            bail!("{id:?} is not a task id; `beamlet task submit` prints one");
        }
        Ok(format!("{}/v1/tasks/{id}{rest}", self.base))
    }

    pub(crate) async fn deploy(&self, wasm: &Path, name: &str, config: Option<&Path>) -> Result<()> {
        let bytes = std::fs::read(wasm).with_context(|| format!("failed to read component {wasm:?}"))?;
        let config = match config {
            Some(path) => std::fs::read_to_string(path).with_context(|| format!("failed to read config {path:?}"))?,
            None => String::new(),
        };
        let total = bytes.len() as u64;
        let progress = progress_bar(total);
        let chunks: Vec<bytes::Bytes> =
            bytes::Bytes::from(bytes).chunks(UPLOAD_CHUNK).map(bytes::Bytes::copy_from_slice).collect();
        let upload_progress = progress.clone();
        let stream = futures_util::stream::iter(chunks).map(move |chunk| {
            upload_progress.inc(chunk.len() as u64);
            if upload_progress.position() >= total {
                upload_progress.set_message("compiling on the server");
            }
            Ok::<_, std::io::Error>(chunk)
        });
        let file_name = wasm.file_name().map_or("app.wasm".into(), |n| n.to_string_lossy().into_owned());
        let part = Part::stream_with_length(reqwest::Body::wrap_stream(stream), total)
            .file_name(file_name)
            .mime_str("application/wasm")?;
        let mut form = Form::new().part("component", part);
        if !config.is_empty() {
            form = form.text("config", config);
        }
        let request = self.http.put(self.app_url(name, "")?).multipart(form);
        let result = self.send(request).await;
        progress.finish_and_clear();
        let body = self.json(result?).await?;
        println!(
            "deployed {} version {} ({}, sha256 {})",
            body["name"].as_str().unwrap_or(name),
            body["version"],
            body["world"].as_str().unwrap_or("?"),
            body["digest"].as_str().unwrap_or("?").get(..12).unwrap_or("?")
        );
        for warning in body["warnings"].as_array().into_iter().flatten() {
            eprintln!("warning: {}", warning.as_str().unwrap_or_default());
        }
        if body["world"] == "wasi:http/proxy" {
            println!("call it: curl -s {}/http/{name}/", self.base);
        } else {
            println!(
                "call it: curl -s -X POST {}/v1/apps/{name}/invoke -d 'INPUT' (your handler's JSON input)",
                self.base
            );
        }
        Ok(())
    }

    pub(crate) async fn invoke(&self, name: &str, input: Vec<u8>) -> Result<()> {
        let request = self.http.post(self.app_url(name, "/invoke")?).body(input);
        let output = self.send(request).await?.bytes().await?;
        print_output(&output);
        Ok(())
    }

    pub(crate) async fn task_submit(&self, name: &str, input: Vec<u8>) -> Result<()> {
        let request = self.http.post(self.app_url(name, "/tasks")?).body(input);
        let body = self.json(self.send(request).await?).await?;
        println!("{}", body["task_id"].as_str().unwrap_or_default());
        Ok(())
    }

    pub(crate) async fn task_status(&self, id: &str) -> Result<()> {
        print_json(&self.get_json(self.task_url(id, "")?).await?);
        Ok(())
    }

    pub(crate) async fn task_wait(&self, id: &str, timeout: &str) -> Result<()> {
        let timeout = crate::config::parse_duration(timeout).map_err(|e| anyhow!("--timeout: {e}"))?;
        let deadline = tokio::time::Instant::now() + timeout;
        // The node and the task are there: a wrong --server or id fails at once.
        self.get_json(self.task_url(id, "")?).await?;
        let mut said_away = false;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // To the millisecond: `--timeout 3s` gives up after 3 s, not 4.
            let wait = left.min(Duration::from_secs(30)).as_millis();
            let url = self.task_url(id, &format!("?wait={wait}ms"))?;
            // The node may go away while we wait (stopping, restarting: it
            // keeps its tasks): then wait for it to come back, up to the timeout.
            let reply = match self.http.get(url).send().await {
                Ok(response) if response.status().is_success() => Ok(self.json(response).await?),
                Ok(response) if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                    Err(api_error(response.status(), &response.text().await.unwrap_or_default()))
                }
                Ok(response) => return Err(api_error(response.status(), &response.text().await.unwrap_or_default())),
                Err(e) => Err(anyhow!("{e}")),
            };
            let record = match reply {
                Ok(record) => record,
                Err(e) if left.is_zero() => bail!(
                    "lost the node while waiting for task {id}: {e:#}\n(a node that stops keeps its tasks: run \
                     `beamlet task wait {id}` again once it is back)"
                ),
                Err(e) => {
                    if !std::mem::replace(&mut said_away, true) {
                        eprintln!(
                            "the node went away while waiting for task {id} ({e:#}); waiting for it to come back"
                        );
                    }
                    tokio::time::sleep(Duration::from_secs(1).min(left)).await;
                    continue;
                }
            };
            said_away = false;
            let status = record["status"].as_str().unwrap_or_default().to_owned();
            let terminal = matches!(status.as_str(), "COMPLETE" | "FAILED" | "TIMEOUT" | "CANCELLED" | "EXPIRED");
            if terminal {
                eprintln!("{status}");
                if status == "COMPLETE" {
                    let response = self.send(self.http.get(self.task_url(id, "/result")?)).await?;
                    print_output(&response.bytes().await?);
                    return Ok(());
                }
                let error = &record["error"];
                let message = error["message"].as_str().unwrap_or("no details");
                let runs = match record["attempts"].as_u64() {
                    Some(n) if n > 1 => format!(", after {n} attempts"),
                    _ => String::new(),
                };
                let code = error["code"].as_str().map(|code| format!(" ({code}{runs})")).unwrap_or_default();
                bail!("task {id} ended {status}: {message}{code}");
            }
            if left.is_zero() {
                bail!(
                    "task {id} is still {status} after {}; wait again or cancel it",
                    crate::config::format_duration(timeout)
                );
            }
        }
    }

    pub(crate) async fn task_list(
        &self,
        name: &str,
        status: Option<&str>,
        limit: usize,
        before: Option<&str>,
    ) -> Result<()> {
        let mut url = reqwest::Url::parse(&self.app_url(name, "/tasks")?)?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("limit", &limit.to_string());
            for (key, value) in [("status", status), ("before", before)] {
                if let Some(value) = value {
                    query.append_pair(key, value);
                }
            }
        }
        let body = self.get_json(url.into()).await?;
        let tasks = body["tasks"].as_array().map(Vec::as_slice).unwrap_or_default();
        if tasks.is_empty() {
            println!("no {}tasks", status.map(|status| format!("{status} ")).unwrap_or_default());
            return Ok(());
        }
        println!("{:<36} {:<9} {:>8} {:>10} ERROR", "ID", "STATUS", "ATTEMPTS", "AGE");
        let now = crate::queue::now_ms();
        for task in tasks {
            let created = task["created_at"].as_u64().map(|created| time_since(created, now));
            println!(
                "{:<36} {:<9} {:>8} {:>10} {}",
                task["id"].as_str().unwrap_or_default(),
                task["status"].as_str().unwrap_or_default(),
                task["attempts"].to_string(),
                created.unwrap_or_default(),
                task["error"]["code"].as_str().unwrap_or_default()
            );
        }
        if let Some(next) = body["next"].as_str() {
            let status = status.map(|status| format!(" --status {status}")).unwrap_or_default();
            println!("more: beamlet task list {name}{status} --limit {limit} --before {next} --server {}", self.base);
        }
        Ok(())
    }

    pub(crate) async fn task_cancel(&self, id: &str) -> Result<()> {
        let response = self.send(self.http.delete(self.task_url(id, "")?)).await?;
        print_json(&self.json(response).await?);
        Ok(())
    }

    pub(crate) async fn apps(&self) -> Result<()> {
        let body = self.get_json(format!("{}/v1/apps", self.base)).await?;
        let apps = body["apps"].as_array().cloned().unwrap_or_default();
        if apps.is_empty() {
            println!("no apps yet; deploy one with `beamlet deploy APP.wasm --name NAME`");
            return Ok(());
        }
        let width = apps.iter().filter_map(|app| app["name"].as_str()).map(str::len).max().unwrap_or(0).max(24);
        // The header and each app's row, in the same columns.
        let row = |[name, version, replicas, pending, failing, queued, running]: [String; 7]| {
            println!("{name:<width$} {version:>7} {replicas:>8} {pending:>7} {failing:>7} {queued:>7} {running:>7}");
        };
        row(["NAME", "VERSION", "REPLICAS", "PENDING", "FAILING", "QUEUED", "RUNNING"].map(String::from));
        for app in apps {
            // In a cluster: this node's + the other nodes'.
            let replicas = match app["replicas_on_other_nodes"].as_u64() {
                Some(others) => format!("{}+{others}", app["replicas"]),
                None => app["replicas"].to_string(),
            };
            let count = |key: &str| app[key].as_u64().unwrap_or(0).to_string();
            row([
                app["name"].as_str().unwrap_or_default().to_owned(),
                app["version"].to_string(),
                replicas,
                count("pending_replicas"),
                count("failing_replicas"),
                app["queue"]["queued"].to_string(),
                app["queue"]["running"].to_string(),
            ]);
        }
        Ok(())
    }

    pub(crate) async fn status(&self, name: &str, json: bool) -> Result<()> {
        let app = self.get_json(self.app_url(name, "")?).await?;
        if json {
            print_json(&app);
        } else {
            print!("{}", describe_app(&app, crate::queue::now_ms()));
        }
        Ok(())
    }

    pub(crate) async fn logs(&self, name: &str, lines: usize) -> Result<()> {
        let body = self.get_json(self.app_url(name, &format!("/logs?lines={lines}"))?).await?;
        let lines = body["lines"].as_array().map(Vec::as_slice).unwrap_or_default();
        if lines.is_empty() {
            // On stderr: a script reading the lines still gets none.
            eprintln!("no log lines of app {name} yet (its guests' stdout and stderr, and its replicas' troubles)");
        }
        for line in lines {
            println!("{}", printable(line.as_str().unwrap_or_default()));
        }
        Ok(())
    }

    pub(crate) async fn delete(&self, name: &str) -> Result<()> {
        self.send(self.http.delete(self.app_url(name, "")?)).await?;
        println!("removed {name}");
        Ok(())
    }
}

use futures_util::StreamExt as _;

fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {bytes}/{total_bytes}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("uploading");
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// A builder of HTTP clients, with the TLS provider they use installed
/// (rustls with ring, for https callbacks and `--server https://`).
pub(crate) fn http_client() -> reqwest::ClientBuilder {
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        // Fails only when a provider is installed already: that one serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
}

/// A request that failed, with its root cause: reqwest's own words stop at
/// "error sending request".
pub(crate) fn describe_http_error(e: &reqwest::Error) -> String {
    match std::iter::successors(std::error::Error::source(e), |cause| cause.source()).last() {
        Some(root) => format!("{e} ({root})"),
        None => e.to_string(),
    }
}

fn api_error(status: StatusCode, body: &str) -> anyhow::Error {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    match parsed.as_ref().and_then(|v| v.get("error")) {
        // The message may quote a guest's stderr.
        Some(error) => anyhow!(
            "{} ({}, HTTP {})",
            printable(error["message"].as_str().unwrap_or("no message")),
            error["code"].as_str().unwrap_or("?"),
            status.as_u16()
        ),
        None => {
            // A page from something else (a proxy, another server): its gist.
            let text = body.split_whitespace().collect::<Vec<_>>().join(" ");
            let gist = match text.char_indices().nth(200) {
                Some((cut, _)) => format!("{}...", &text[..cut]),
                None => text,
            };
            anyhow!(
                "the server answered HTTP {status}, not as a beamlet node does (is --server, or BEAMLET_SERVER, \
                 right?): {gist}"
            )
        }
    }
}

/// `beamlet status NAME` for people: the app's version, queue, autoscaler,
/// replicas and config, from its `GET /v1/apps/{name}` record.
fn describe_app(app: &Value, now_ms: u64) -> String {
    use std::fmt::Write as _;
    let text = |value: &Value| match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let since = |at: &Value| at.as_u64().map(|at| time_since(at, now_ms));
    let mut out = String::new();
    let digest = app["digest"].as_str().unwrap_or_default();
    let _ = writeln!(
        out,
        "{} version {} ({}, sha256 {}), deployed {}",
        text(&app["name"]),
        app["version"],
        text(&app["world"]),
        &digest[..digest.len().min(12)],
        since(&app["deployed_at"]).map_or_else(|| "at an unknown time".into(), |since| since + " ago")
    );
    let average = app["avg_task_ms"].as_f64().map(|ms| format!("; average task {ms:.3} ms")).unwrap_or_default();
    let _ =
        writeln!(out, "queue       {} queued, {} running{average}", app["queue"]["queued"], app["queue"]["running"]);
    let autoscaler = &app["autoscaler"];
    if !autoscaler.is_null() {
        // Before its first decision on this node (just deployed, or run elsewhere) it has none to show.
        let decided = match autoscaler["desired"].as_u64() {
            Some(desired) => format!(
                "desired {desired} of at most {}; last decision: {}",
                autoscaler["max"],
                text(&autoscaler["reason"])
            ),
            None => match autoscaler["max"].as_u64() {
                Some(1) => "at most 1 replica; no decision on this node yet".to_owned(),
                max => format!("at most {} replicas; no decision on this node yet", max.unwrap_or_default()),
            },
        };
        let _ = writeln!(out, "autoscaler  {decided}");
    }
    let replicas = app["replicas"].as_array().map(Vec::as_slice).unwrap_or_default();
    let others = app["replicas_on_other_nodes"].as_u64().map(|n| format!(" (+{n} on other nodes)")).unwrap_or_default();
    // Counted as `beamlet apps` counts them: pending and failing ones apart.
    let pending = replicas.iter().filter(|replica| replica["state"] == "pending").count();
    let failing = replicas.iter().filter(|replica| replica["state"] != "pending" && replica["failing"] == true).count();
    let apart = [(pending, "pending"), (failing, "failing")]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!(", {n} {what}"))
        .collect::<String>();
    let live = replicas.len() - pending - failing;
    let _ = writeln!(out, "replicas    {live} on this node{apart}{others}");
    // The header and each replica's row, in the same columns.
    let id_width = replicas.iter().filter_map(|replica| replica["id"].as_str()).map(str::len).fold(2, usize::max);
    let row = |out: &mut String, [id, version, state, workers, busy, done, restarts, pid, up]: [String; 9]| {
        let _ = writeln!(
            out,
            "  {id:<id_width$} {version:>7} {state:<15} {workers:>7} {busy:>4} {done:>8} {restarts:>8} {pid:>8} {up:>10}"
        );
    };
    if !replicas.is_empty() {
        let header = ["ID", "VERSION", "STATE", "WORKERS", "BUSY", "DONE", "RESTARTS", "PID", "UP"];
        row(&mut out, header.map(String::from));
    }
    for replica in replicas {
        let state = text(&replica["state"]) + if replica["failing"] == true { ",failing" } else { "" };
        let pid = replica["pid"].as_u64().map_or_else(|| "-".into(), |pid| pid.to_string());
        // A replica between processes (backoff) has no uptime.
        let up = replica["pid"].as_u64().and(since(&replica["started_at"])).unwrap_or_else(|| "-".into());
        let count = |key: &str| replica[key].to_string();
        let [version, workers, busy, done, restarts] =
            ["version", "workers", "busy", "tasks_done", "restarts"].map(count);
        row(&mut out, [text(&replica["id"]), version, state, workers, busy, done, restarts, pid, up]);
        for (label, key) in [("gpu", "gpu"), ("waits", "pending_reason"), ("last error", "last_error")] {
            if let Some(value) = replica[key].as_str() {
                let _ = writeln!(out, "    {label}: {value}");
            }
        }
        // RESTARTS counts every restart; this, the starts that failed since
        // the last good one.
        if let Some(failed) = replica["failed_starts"].as_u64().filter(|n| *n > 0) {
            let _ = writeln!(out, "    failing: its last {failed} start(s) failed; it is retried with backoff");
        }
        if replica["gpu"].is_string() {
            let used = replica["gpu_memory_used"].as_u64().unwrap_or(0);
            let _ = writeln!(out, "    gpu memory used: {}", crate::config::describe_size(used));
        }
    }
    // The config as deployed, one line per section; unset keys left out.
    let mut label = "config";
    for (section, keys) in app["config"].as_object().into_iter().flatten() {
        // Without a kind there is no autoscaler: its other keys' defaults
        // mean nothing, only the pool's size does.
        if section == "autoscaler" && keys["kind"].is_null() {
            let pool = keys["min_replicas"].as_u64().unwrap_or(0).max(1);
            let _ = writeln!(out, "{label:<11} [{section}] none: a fixed pool of {pool}");
            label = "";
            continue;
        }
        let keys = keys.as_object().into_iter().flatten();
        let set: Vec<String> = keys
            .filter(|(_, value)| !value.is_null() && value.as_array().is_none_or(|list| !list.is_empty()))
            .map(|(key, value)| format!("{key} = {}", text(value)))
            .collect();
        let _ = writeln!(out, "{label:<11} [{section}] {}", set.join(", "));
        label = "";
    }
    if let Some(secret) = app["callback_secret"].as_str() {
        let _ = writeln!(out, "secret      {secret} (signs callbacks)");
    }
    out
}

/// Whole seconds from `at_ms` to `now_ms`, as `1m5s`.
fn time_since(at_ms: u64, now_ms: u64) -> String {
    crate::config::format_duration(Duration::from_secs(now_ms.saturating_sub(at_ms) / 1000))
}

fn print_output(output: &[u8]) {
    match serde_json::from_slice::<Value>(output) {
        Ok(value) => print_json(&value),
        Err(_) => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(output);
        }
    }
}

fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

/// A guest's log line as it may reach a terminal: control characters
/// (escape sequences, a carriage return drawing over the line's prefix)
/// are shown escaped (`\u{1b}`), not run; tabs and line breaks stay.
fn printable(line: &str) -> String {
    let mut shown = String::with_capacity(line.len());
    for c in line.chars() {
        if c.is_control() && !matches!(c, '\t' | '\n') {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{api_error, describe_app, printable};

    #[test]
    fn guest_log_lines_cannot_drive_the_terminal() {
        let line = "\u{1b}[2Jcleared\r[task x stdout] forged\tok";
        assert_eq!(printable(line), "\\u{1b}[2Jcleared\\r[task x stdout] forged\tok");
        assert_eq!(printable("plain ünïcode"), "plain ünïcode");
    }

    #[test]
    fn an_error_page_from_something_other_than_a_node_is_shown_in_brief() {
        let beamlet = r#"{"error": {"code": "UNKNOWN_TASK", "message": "no task \"x\""}}"#;
        let shown = api_error(reqwest::StatusCode::NOT_FOUND, beamlet).to_string();
        assert_eq!(shown, r#"no task "x" (UNKNOWN_TASK, HTTP 404)"#);
        let page =
            format!("<html>\n<head><title>404 Not Found</title></head>\n<body>{}</body></html>", "x".repeat(500));
        let shown = api_error(reqwest::StatusCode::NOT_FOUND, &page).to_string();
        assert!(shown.contains("not as a beamlet node does") && shown.contains("<head><title>404"), "{shown}");
        assert!(!shown.contains('\n') && shown.ends_with("...") && shown.len() < 400, "{shown}");
    }

    #[test]
    fn status_shows_each_replica_with_its_troubles_and_the_config_that_is_set() {
        let app = json!({
            "name": "mlp", "version": 3, "world": "beamlet:function/function",
            "digest": "4351957f2101b33283c122e5", "deployed_at": 1_000_000,
            "queue": {"queued": 5, "running": 2}, "avg_task_ms": 12.5,
            "autoscaler": {"desired": 2, "max": 3, "reason": "queue_depth: 7 tasks -> desired 2"},
            "replicas": [
                {"id": "mlp-v3-r0", "version": 3, "state": "ready", "failing": false, "workers": 2, "busy": 2,
                 "tasks_done": 40, "restarts": 0, "pid": 77, "started_at": 1_060_000,
                 "gpu": "0: NVIDIA H100 80GB HBM3", "gpu_memory_used": 3u64 << 30, "last_error": null, "pending_reason": null},
                {"id": "mlp-v3-r1-with-a-long-name", "version": 3, "state": "backoff", "failing": true,
                 "failed_starts": 3, "workers": 2, "busy": 0,
                 "tasks_done": 0, "restarts": 4, "pid": null, "started_at": 1_100_000, "gpu": null,
                 "gpu_memory_used": 0, "last_error": "init failed: no model", "pending_reason": null}
            ],
            "replicas_on_other_nodes": 1,
            "config": {"runtime": {"workers": 2, "gpu": "any", "gpu_memory": null, "allowed_outbound_hosts": []}},
            "callback_secret": "s3cret"
        });
        let text = describe_app(&app, 1_120_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "mlp version 3 (beamlet:function/function, sha256 4351957f2101), deployed 2m ago");
        assert_eq!(lines[1], "queue       5 queued, 2 running; average task 12.500 ms");
        assert!(
            lines[2].ends_with("desired 2 of at most 3; last decision: queue_depth: 7 tasks -> desired 2"),
            "{text}"
        );
        assert_eq!(lines[3], "replicas    1 on this node, 1 failing (+1 on other nodes)");
        let ready: Vec<&str> = lines[5].split_whitespace().collect();
        assert_eq!(ready, ["mlp-v3-r0", "3", "ready", "2", "2", "40", "0", "77", "1m"]);
        assert_eq!(lines[6], "    gpu: 0: NVIDIA H100 80GB HBM3");
        assert_eq!(lines[7], "    gpu memory used: 3Gi");
        let failing: Vec<&str> = lines[8].split_whitespace().collect();
        // No process, so no uptime, whenever its last one started.
        assert_eq!(failing, ["mlp-v3-r1-with-a-long-name", "3", "backoff,failing", "2", "0", "0", "4", "-", "-"]);
        // Every row's columns line up, whatever the length of an id.
        let version_end = lines[4].find("VERSION").unwrap() + "VERSION".len();
        for row in [lines[5], lines[8]] {
            assert_eq!(row.find(" 3 ").unwrap() + 2, version_end, "{text}");
        }
        assert_eq!(lines[9], "    last error: init failed: no model");
        assert_eq!(lines[10], "    failing: its last 3 start(s) failed; it is retried with backoff");
        // Unset keys (null, an empty list) are left out.
        assert_eq!(lines[11], "config      [runtime] gpu = any, workers = 2");
        assert_eq!(lines[12], "secret      s3cret (signs callbacks)");
        assert_eq!(lines.len(), 13, "{text}");

        let mut undecided = app.clone();
        undecided["autoscaler"] = json!({"desired": null, "max": 1, "reason": null});
        let text = describe_app(&undecided, 1_120_000);
        assert_eq!(text.lines().nth(2), Some("autoscaler  at most 1 replica; no decision on this node yet"), "{text}");

        // A fixed pool: the autoscaler's defaults are not shown as settings.
        let mut pool = app.clone();
        pool["config"]["autoscaler"] = json!({"min_replicas": 2, "keep_warm": "10s"});
        let text = describe_app(&pool, 1_120_000);
        assert!(text.contains("[autoscaler] none: a fixed pool of 2\n"), "{text}");
        assert!(!text.contains("keep_warm"), "{text}");
    }
}
