//! Tiers served by pools: three real `jemma serve` nodes (the tiny fixture model) as one pool behind a
//! fourth — conversations stay on one node and hit its prefix cache, and a node killed with SIGKILL mid-load
//! and restarted loses nothing — and a pool of OpenAI-compatible upstreams that answer 500s, hang, cut
//! streams and throttle with `Retry-After`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::support::{Server, fixture, health, sse_answer, wait_for};

async fn node(extra: Vec<String>) -> Server {
    tokio::task::spawn_blocking(move || {
        let tiny = fixture("tiny");
        let mut args = vec!["--model".to_string(), tiny.display().to_string()];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start(&args, None)
    })
    .await
    .unwrap()
}

/// Runs the `jemma` CLI with `args` (and `env`) and parses what it prints as JSON; it must succeed.
async fn jemma_json(args: Vec<String>, env: Vec<(String, String)>) -> Value {
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_jemma"));
        cmd.args(&args).envs(env);
        crate::support::output_within(&mut cmd, crate::support::CMD_DEADLINE)
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn gateway(config: String) -> Server {
    tokio::task::spawn_blocking(move || Server::start(&[], Some(&config)))
        .await
        .unwrap()
}

/// The pool's view of each endpoint in the gateway's /health: name → status.
fn endpoint_status(gw: &Server, tier: &str) -> Vec<(String, String)> {
    health(gw)["tiers"][tier]["backend"]["details"]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or("").to_string(),
                e["status"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// One chat completion; Ok(content, routing) for a complete answer, Err(why) for anything else (an error
/// status, an error event, a stream without its end).
async fn complete(
    client: &reqwest::Client,
    gw: &str,
    body: &Value,
) -> Result<(String, Value, Value), String> {
    let r = client
        .post(format!("{gw}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .map_err(|e| format!("transport: {e}"))?;
    let status = r.status().as_u16();
    let text = r.text().await.map_err(|e| format!("body: {e}"))?;
    if status != 200 {
        return Err(format!("{status}: {text}"));
    }
    if body["stream"] != json!(true) {
        let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let finish = &v["choices"][0]["finish_reason"];
        if !(finish == "stop" || finish == "length") {
            return Err(format!("no finish_reason: {text}"));
        }
        let content = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .to_string();
        return Ok((content, v["_routing"].clone(), v["usage"].clone()));
    }
    if !text.trim_end().ends_with("data: [DONE]") {
        return Err(format!("truncated stream: {text}"));
    }
    let (mut content, mut routing, mut usage, mut finished) =
        (String::new(), Value::Null, Value::Null, false);
    for l in text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
    {
        let v: Value = serde_json::from_str(l).map_err(|e| format!("{e}: {l}"))?;
        if v.get("error").is_some() {
            return Err(format!("error event: {l}"));
        }
        content.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        finished |= v["choices"][0]["finish_reason"].is_string();
        if v.get("_routing").is_some() {
            routing = v["_routing"].clone();
        }
        if v["usage"].is_object() {
            usage = v["usage"].clone();
        }
    }
    if !finished {
        return Err(format!("stream without a finish_reason: {text}"));
    }
    Ok((content, routing, usage))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_as_one_pool_keep_conversations_and_survive_a_killed_node() {
    let mut nodes = vec![];
    for _ in 0..3 {
        nodes.push(node(vec![]).await);
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let mut config = "[tiers.primary]\nprobe_interval_secs = 0.3\nfirst_token_timeout_secs = 30\n\
                      idle_timeout_secs = 10\nmax_queue = 256\n"
        .to_string();
    for (i, u) in urls.iter().enumerate() {
        config.push_str(&format!(
            "[[tiers.primary.endpoints]]\nkind = \"jemma\"\nname = \"node-{i}\"\nurl = \"{u}\"\n"
        ));
    }
    let gw = gateway(config).await;
    let client = reqwest::Client::new();
    assert_eq!(
        endpoint_status(&gw, "primary"),
        (0..3)
            .map(|i| (format!("node-{i}"), "up".to_string()))
            .collect::<Vec<_>>()
    );

    // Affinity: three 10-turn conversations at once; each stays on one node and, from its second turn,
    // finds its earlier turns in that node's prefix cache.
    let mut convs = vec![];
    for c in 0..3 {
        let (client, url) = (client.clone(), gw.url.clone());
        convs.push(tokio::spawn(async move {
            let mut messages = vec![json!({"role": "system", "content": format!("You are assistant number {c}.")})];
            let mut seen: Option<String> = None;
            for turn in 0..10 {
                messages.push(json!({"role": "user", "content": format!("Conversation {c}, question {turn}: go on.")}));
                let body = json!({"model": "primary", "messages": messages, "max_tokens": 6,
                    "temperature": 0, "stream": turn % 2 == 1, "stream_options": {"include_usage": true}});
                let (content, routing, usage) = complete(&client, &url, &body).await.unwrap();
                let ep = routing["endpoint"].as_str().expect("_routing.endpoint").to_string();
                assert_eq!(seen.get_or_insert(ep.clone()), &ep, "conversation {c} moved at turn {turn}");
                let cached = usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
                if turn > 0 {
                    assert!(cached > 0, "conversation {c} turn {turn}: no cached tokens: {usage}");
                }
                messages.push(json!({"role": "assistant", "content": content}));
            }
            seen.unwrap()
        }));
    }
    for c in convs {
        c.await.unwrap();
    }

    // 200 requests, half streaming, from 12 clients; node-1 is killed with SIGKILL after 50 have
    // finished and restarted on its port after 130.
    let port: u16 = urls[1].rsplit(':').next().unwrap().parse().unwrap();
    let victim = Arc::new(Mutex::new(Some(nodes.remove(1))));
    let done = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let continued = Arc::new(AtomicU64::new(0));
    let mut workers = vec![];
    for _ in 0..12 {
        let (client, url, done, next, failures, continued) = (
            client.clone(),
            gw.url.clone(),
            done.clone(),
            next.clone(),
            failures.clone(),
            continued.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= 200 {
                    return;
                }
                let body = json!({"model": "primary", "max_tokens": 12, "temperature": 0,
                    "stream": i % 2 == 0,
                    "messages": [{"role": "user", "content": format!("Request {i}: tell me a story.")}]});
                match tokio::time::timeout(Duration::from_secs(60), complete(&client, &url, &body))
                    .await
                {
                    Ok(Ok((_, routing, _))) => {
                        let hops = routing["fallback"].to_string();
                        if hops.contains("primary[node-1]") {
                            continued.fetch_add(1, Ordering::SeqCst);
                        }
                        // Never another tier: the pool absorbed the failure.
                        assert_eq!(routing["tier"], "primary", "{routing}");
                    }
                    Ok(Err(e)) => failures.lock().unwrap().push(format!("request {i}: {e}")),
                    Err(_) => failures.lock().unwrap().push(format!("request {i}: hung")),
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let t0 = Instant::now();
    while done.load(Ordering::SeqCst) < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGKILL (Child::kill): no goodbye to the streams it was serving.
    drop(victim.lock().unwrap().take());
    let killed_at = Instant::now();
    let gw_url = gw.url.clone();
    let status_of = |gw: &Server| {
        endpoint_status(gw, "primary")
            .into_iter()
            .find(|(n, _)| n == "node-1")
            .map(|(_, s)| s)
            .unwrap_or_default()
    };
    let gw = tokio::task::spawn_blocking(move || {
        wait_for("node-1 out of the pool", Duration::from_secs(10), || {
            status_of(&gw) == "down"
        });
        gw
    })
    .await
    .unwrap();
    let out_after = killed_at.elapsed();
    while done.load(Ordering::SeqCst) < 130 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restarted = node(vec!["--port".into(), port.to_string()]).await;
    let gw = tokio::task::spawn_blocking(move || {
        wait_for("node-1 back in the pool", Duration::from_secs(10), || {
            status_of(&gw) == "up"
        });
        gw
    })
    .await
    .unwrap();
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    println!(
        "pool: 200 requests in {:.1} s, {} failed, {} retried or continued after node-1's kill; \
         node-1 out {:.2} s after SIGKILL",
        t0.elapsed().as_secs_f64(),
        failures.len(),
        continued.load(Ordering::SeqCst),
        out_after.as_secs_f64()
    );
    assert!(failures.is_empty(), "lost or truncated: {failures:#?}");
    assert!(
        continued.load(Ordering::SeqCst) > 0,
        "no request was in flight on node-1 or sent to it after the kill"
    );
    // Back in and serving: new conversations reach it again.
    let mut reached = false;
    for i in 0..30 {
        let body = json!({"model": "primary", "max_tokens": 2,
            "messages": [{"role": "user", "content": format!("after restart {i}")}]});
        let (_, routing, _) = complete(&client, &gw_url, &body).await.unwrap();
        reached |= routing["endpoint"] == "node-1";
    }
    assert!(reached, "the restarted node got no requests");

    // A node that hangs rather than dies (SIGSTOP: it accepts connections and answers nothing) is taken
    // out by the active probe alone, and brought back by it after SIGCONT.
    let frozen = nodes[1].child.id() as i32;
    // SAFETY: sending a signal to a child process this test started and still owns.
    assert_eq!(unsafe { libc::kill(frozen, libc::SIGSTOP) }, 0);
    let gw = tokio::task::spawn_blocking(move || {
        wait_for(
            "the frozen node-2 out of the pool",
            Duration::from_secs(15),
            || {
                endpoint_status(&gw, "primary")
                    .iter()
                    .any(|(n, s)| n == "node-2" && s == "down")
            },
        );
        gw
    })
    .await
    .unwrap();
    let why = health(&gw)["tiers"]["primary"]["backend"]["details"]["endpoints"][2]["last_error"]
        .to_string();
    assert!(why.contains("timed out"), "{why}");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(frozen, libc::SIGCONT) }, 0);
    let gw = tokio::task::spawn_blocking(move || {
        wait_for("node-2 back after SIGCONT", Duration::from_secs(15), || {
            endpoint_status(&gw, "primary")
                .iter()
                .any(|(n, s)| n == "node-2" && s == "up")
        });
        gw
    })
    .await
    .unwrap();
    drop(restarted);
    drop(gw);
}

/// An OpenAI-compatible upstream that misbehaves in one way, counting its chat requests.
#[derive(Clone)]
struct Upstream {
    mode: &'static str,
    hits: Arc<AtomicU64>,
    continuations: Arc<AtomicU64>,
}

async fn misbehave(
    axum::extract::State(u): axum::extract::State<Upstream>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    u.hits.fetch_add(1, Ordering::SeqCst);
    let msgs = body["messages"].as_array().cloned().unwrap_or_default();
    if msgs.last().is_some_and(|m| m["role"] == "assistant") {
        u.continuations.fetch_add(1, Ordering::SeqCst);
    }
    match u.mode {
        "500" => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            "never".into_response()
        }
        "429" | "429-long" => {
            let secs = if u.mode == "429" { "2" } else { "7" };
            (
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", secs)],
                axum::Json(json!({"error": {"message": "slow down", "type": "rate_limit"}})),
            )
                .into_response()
        }
        "cut" => sse_answer(
            &["All ", "good ", "here."],
            Duration::from_millis(2),
            Some(1),
        ),
        _ => {
            // A continuation is answered with the rest of the sentence, as a model would go on.
            let cont = msgs.last().is_some_and(|m| m["role"] == "assistant");
            if cont {
                sse_answer(&["good ", "here."], Duration::from_millis(2), None)
            } else {
                sse_answer(&["All ", "good ", "here."], Duration::from_millis(2), None)
            }
        }
    }
}

async fn upstream(mode: &'static str) -> (String, Upstream) {
    let u = Upstream {
        mode,
        hits: Arc::new(AtomicU64::new(0)),
        continuations: Arc::new(AtomicU64::new(0)),
    };
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(misbehave))
        .route(
            "/v1/models",
            axum::routing::get(|| async { axum::Json(json!({"object": "list", "data": []})) }),
        )
        .with_state(u.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, u)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_pool_rides_out_500s_hangs_cut_streams_and_429s() {
    let mut eps = vec![];
    let mut config = "[breaker]\nfailure_threshold = 3\nwindow_secs = 30\ncooldown_secs = 30\n\
                      [tiers.primary]\nfirst_token_timeout_secs = 1\nidle_timeout_secs = 1\n\
                      probe_interval_secs = 0.5\nmax_queue = 64\n"
        .to_string();
    for mode in ["500", "hang", "cut", "429", "good"] {
        let (url, u) = upstream(mode).await;
        config.push_str(&format!(
            "[[tiers.primary.endpoints]]\nname = \"{mode}\"\nurl = \"{url}\"\nmodel = \"sim\"\nmax_concurrency = 8\n"
        ));
        eps.push(u);
    }
    let gw = gateway(config).await;
    let client = reqwest::Client::new();
    let t0 = Instant::now();
    let mut workers = vec![];
    for w in 0..8u64 {
        let (client, url) = (client.clone(), gw.url.clone());
        workers.push(tokio::spawn(async move {
            let mut out = vec![];
            for i in 0..8u64 {
                let n = w * 8 + i;
                let body = json!({"model": "primary", "max_tokens": 8, "stream": n % 2 == 0,
                    "messages": [{"role": "user", "content": format!("question {n}")}]});
                out.push(complete(&client, &url, &body).await);
            }
            out
        }));
    }
    let mut answers = vec![];
    for w in workers {
        answers.extend(w.await.unwrap());
    }
    let wall = t0.elapsed().as_secs_f64();
    for a in &answers {
        let (content, routing, _) = a.as_ref().unwrap();
        // A stream cut after "All " continues on another endpoint: the client still reads one sentence.
        assert_eq!(content, "All good here.", "{routing}");
        assert_eq!(routing["tier"], "primary");
        assert_eq!(routing["endpoint"], "good", "{routing}");
    }
    let hits = |m: &str| {
        eps.iter()
            .find(|u| u.mode == m)
            .unwrap()
            .hits
            .load(Ordering::SeqCst)
    };
    let before = (hits("500"), hits("hang"), hits("429"));
    assert!(
        before.0 >= 1 && before.1 >= 1 && before.2 >= 1,
        "{before:?}"
    );
    // Now the failing endpoints' breakers are open (3 failures each) and the throttled one is cooling
    // down or, if its 2 s passed, gets one request and cools down again: a quick burst leaves the first
    // two alone and asks the third at most once.
    let t1 = Instant::now();
    for n in 0..6 {
        let body = json!({"model": "primary", "max_tokens": 8,
            "messages": [{"role": "user", "content": format!("burst {n}")}]});
        assert_eq!(
            complete(&client, &gw.url, &body).await.unwrap().0,
            "All good here."
        );
    }
    assert!(t1.elapsed() < Duration::from_secs(2));
    assert_eq!((hits("500"), hits("hang")), (before.0, before.1));
    assert!(
        hits("429") <= before.2 + 1,
        "{} after {}",
        hits("429"),
        before.2
    );
    println!(
        "openai pool: 64 requests in {wall:.1} s; asked 500 ×{}, hang ×{}, 429 ×{} (Retry-After 2 s)",
        before.0, before.1, before.2
    );
    // Cut streams were continued on `good` from the text already sent.
    let cut = eps.iter().find(|u| u.mode == "cut").unwrap();
    let good = eps.iter().find(|u| u.mode == "good").unwrap();
    assert!(cut.hits.load(Ordering::SeqCst) >= 1);
    assert!(good.continuations.load(Ordering::SeqCst) >= 1);
    let status: Vec<(String, String)> = endpoint_status(&gw, "primary");
    assert_eq!(
        status.last().unwrap(),
        &("good".to_string(), "up".to_string())
    );
    let m = crate::support::get_text(&client, &format!("{}/metrics", gw.url)).await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("jemma_endpoint_requests_total")
                && l.contains("endpoint=\"good\"")
                && l.contains("status=\"ok\"")),
        "no per-endpoint metrics"
    );

    // Every endpoint throttling: the client is told 429 with the soonest Retry-After.
    let (a, _) = upstream("429-long").await;
    let (b, _) = upstream("429").await;
    let gw2 = gateway(format!(
        "[tiers.fast]\n[[tiers.fast.endpoints]]\nurl = \"{a}\"\n[[tiers.fast.endpoints]]\nurl = \"{b}\"\n"
    ))
    .await;
    let r = client
        .post(format!("{}/v1/chat/completions", gw2.url))
        .json(&json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "2");
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");

    // `jemma doctor --config` probes each endpoint as the gateway does, and says which dialect an OpenAI
    // server reads.
    let good_url = format!("http://{}", {
        let (u, _) = upstream("good").await;
        u.trim_start_matches("http://").to_string()
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("jemma.toml");
    std::fs::write(
        &cfg,
        format!(
            "[tiers.heavy]\n[[tiers.heavy.endpoints]]\nname = \"gpu\"\nurl = \"{good_url}\"\n\
             [[tiers.heavy.endpoints]]\nkind = \"jemma\"\nname = \"gone\"\nurl = \"http://127.0.0.1:1\"\n"
        ),
    )
    .unwrap();
    let report = jemma_json(
        vec![
            "doctor".into(),
            "--json".into(),
            "--config".into(),
            cfg.display().to_string(),
        ],
        vec![],
    )
    .await;
    let pools = report["pools"].as_array().unwrap();
    assert_eq!(pools[0]["name"], "gpu");
    // Up, and (its model list names no owner) taken to read only OpenAI's fields.
    assert_eq!(
        pools[0]["status"], "up (reads the openai dialect)",
        "{pools:?}"
    );
    assert_eq!(pools[1]["kind"], "jemma");
    assert!(
        pools[1]["status"].as_str().unwrap().starts_with("down: "),
        "{pools:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jemma_peers_finds_the_jemma_nodes_on_the_tailnet() {
    // One port for every machine, as on a tailnet where each node's gateway listens on 8080: a free one
    // on 127.0.0.2 (a Jemma node) and 127.0.0.3 (some other HTTP server).
    let probe = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let other = tokio::net::TcpListener::bind(("127.0.0.3", port))
        .await
        .unwrap();
    let app = axum::Router::new().route(
        "/health",
        axum::routing::get(|| async { axum::Json(json!({"status": "ok"})) }),
    );
    tokio::spawn(async move { axum::serve(other, app).await.unwrap() });
    let node = node(vec![
        "--host".into(),
        "127.0.0.2".into(),
        "--port".into(),
        port.to_string(),
    ])
    .await;
    // A stand-in `tailscale` CLI (the real one cannot run here) whose status lists three peers.
    let dir = tempfile::tempdir().unwrap();
    let status = json!({
        "BackendState": "Running", "Version": "1.82.5",
        "Self": {"HostName": "mac-mini", "DNSName": "mac-mini.tail1234.ts.net.", "TailscaleIPs": ["127.0.0.1"], "Online": true},
        "Peer": {
            "nodekey:a": {"HostName": "mini-2", "DNSName": "mini-2.tail1234.ts.net.", "TailscaleIPs": ["127.0.0.2"], "Online": true, "OS": "macOS"},
            "nodekey:b": {"HostName": "build-box", "TailscaleIPs": ["127.0.0.3"], "Online": true, "OS": "linux"},
            "nodekey:c": {"HostName": "old-laptop", "TailscaleIPs": ["127.0.0.4"], "Online": false}
        }
    });
    std::fs::write(dir.path().join("status.json"), status.to_string()).unwrap();
    let cli = dir.path().join("tailscale");
    std::fs::write(
        &cli,
        format!(
            "#!/bin/sh\n[ \"$1\" = status ] && exec cat '{}'\nexit 2\n",
            dir.path().join("status.json").display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let nodes = jemma_json(
        vec![
            "peers".into(),
            "--json".into(),
            "--port".into(),
            port.to_string(),
        ],
        vec![("JEMMA_TAILSCALE_CLI".into(), cli.display().to_string())],
    )
    .await;
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["name"], "mini-2");
    assert_eq!(nodes[0]["url"], format!("http://127.0.0.2:{port}"));
    assert_eq!(nodes[0]["version"], env!("CARGO_PKG_VERSION"));
    for t in ["fast", "primary"] {
        assert_eq!(nodes[0]["tiers"][t]["state"], "ready", "{nodes:?}");
        assert!(!nodes[0]["tiers"][t]["model"].as_str().unwrap().is_empty());
    }
    drop(node);
}

/// `POST /admin/tiers/{tier}/endpoints` with `body`: (status, answer).
async fn admin(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = client.request(method, url);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_joins_a_tier_and_leaves_it_while_the_gateway_serves() {
    // Two real nodes; the first one's primary tier is its own engine until the second joins it.
    let peer = node(vec![]).await;
    let gw = node(vec![]).await;
    let client = reqwest::Client::new();
    let at = |p: &str| format!("{}/admin/tiers/{p}", gw.url);
    let ask = |i: usize| {
        json!({"model": "primary", "messages": [{"role": "user", "content": format!("Question {i}: say something.")}],
               "max_tokens": 3, "temperature": 0})
    };
    let (status, v) = admin(
        &client,
        reqwest::Method::POST,
        at("primary/endpoints"),
        Some(json!({"kind": "jemma", "name": "mini-2", "url": peer.url, "max_concurrency": 2})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["endpoints"], json!(["local", "mini-2"]), "{v}");
    assert_eq!(
        endpoint_status(&gw, "primary"),
        vec![
            ("local".to_string(), "up".to_string()),
            ("mini-2".to_string(), "up".to_string())
        ]
    );
    // Conversations spread over both (rendezvous hashing): 16 different ones all on one node would be a
    // 1-in-32,768 chance.
    let mut seen = std::collections::BTreeSet::new();
    // A peer's answer names the model it served, not the tier it was asked for.
    let served_model = health(&peer)["tiers"]["primary"]["backend"]["model"].clone();
    assert!(
        served_model.as_str().is_some_and(|m| m != "primary"),
        "{served_model}"
    );
    for i in 0..16 {
        let (_, routing, _) = complete(&client, &gw.url, &ask(i)).await.unwrap();
        seen.insert(routing["endpoint"].as_str().unwrap_or("").to_string());
        assert_eq!(routing["model"], served_model, "{routing}");
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec!["local", "mini-2"]
    );
    let served = |h: &Value| h["tiers"]["primary"]["served"].as_u64().unwrap_or(0);
    assert!(served(&health(&peer)) > 0, "the peer answered nothing");

    // What is refused, in the API's own shape.
    for (body, why) in [
        (
            json!({"kind": "jemma", "name": "mini-2", "url": peer.url}),
            "already has an endpoint",
        ),
        (
            json!({"kind": "jemma", "url": peer.url, "weigth": 2}),
            "unknown field",
        ),
        (json!({"kind": "local"}), "another node"),
        (
            json!({"kind": "jemma", "name": "x", "url": "ftp://nowhere"}),
            "http(s)",
        ),
        (
            json!({"kind": "jemma", "name": "x", "url": peer.url, "weight": 0}),
            "weight",
        ),
        // A reference would send one of this machine's secrets to the URL given.
        (
            json!({"kind": "jemma", "name": "x", "url": peer.url, "key": "keyring:ai.jemma/hf_token"}),
            "not an env: or keyring: reference",
        ),
    ] {
        let (status, v) = admin(
            &client,
            reqwest::Method::POST,
            at("primary/endpoints"),
            Some(body),
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap_or("").contains(why),
            "{why}: {v}"
        );
    }
    let (status, _) = admin(
        &client,
        reqwest::Method::POST,
        at("heavy/endpoints"),
        Some(json!({"kind": "jemma", "url": peer.url})),
    )
    .await;
    assert_eq!(status, 404, "a tier this node does not have");

    // It leaves: new requests stay here; leaving twice, or the last member leaving, is refused.
    let (status, v) = admin(
        &client,
        reqwest::Method::DELETE,
        at("primary/endpoints/mini-2"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["endpoints"], json!(["local"]));
    assert_eq!(
        endpoint_status(&gw, "primary"),
        vec![("local".to_string(), "up".to_string())]
    );
    let before = served(&health(&peer));
    for i in 16..22 {
        let (_, routing, _) = complete(&client, &gw.url, &ask(i)).await.unwrap();
        assert_eq!(routing["endpoint"], "local", "{routing}");
    }
    assert_eq!(
        served(&health(&peer)),
        before,
        "a peer that left still got requests"
    );
    let (status, v) = admin(
        &client,
        reqwest::Method::DELETE,
        at("primary/endpoints/mini-2"),
        None,
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("endpoint_not_found")),
        "{v}"
    );
    let (status, v) = admin(
        &client,
        reqwest::Method::DELETE,
        at("primary/endpoints/local"),
        None,
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("last endpoint"),
        "{v}"
    );
    // Joining again after leaving works (a new member under the old name).
    let (status, v) = admin(
        &client,
        reqwest::Method::POST,
        at("primary/endpoints"),
        Some(json!({"kind": "jemma", "name": "mini-2", "url": peer.url})),
    )
    .await;
    assert_eq!(
        (status, v["endpoints"].clone()),
        (201, json!(["local", "mini-2"])),
        "{v}"
    );
}
