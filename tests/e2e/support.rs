//! Process and fixture helpers shared by the end-to-end tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    jemma_fixtures::fixture(name, "config.json")
}

pub fn python() -> PathBuf {
    let venv = std::env::var("JEMMA_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root().join(".venv"));
    let py = venv.join("bin/python");
    assert!(py.exists(), "{} missing: run scripts/setup", py.display());
    py
}

/// The user's cache that scripts/lib.sh names `JEMMA_CACHE` (else `$XDG_CACHE_HOME/jemma`, else
/// `~/.cache/jemma`): what the setup scripts build once a machine (llama-server, the vLLM venv).
pub fn jemma_cache() -> PathBuf {
    std::env::var_os("JEMMA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("jemma")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/jemma")))
        .expect("JEMMA_CACHE, XDG_CACHE_HOME or HOME")
}

/// How long `jemma serve` may take to print its address (it binds before loading any model).
const SPAWN_DEADLINE: Duration = Duration::from_secs(60);

/// Deadline for a whole HTTP exchange in the end-to-end tests (a streamed answer from a tiny model takes
/// seconds; a hung server must fail the test, not the CI run's time limit).
pub const HTTP_DEADLINE: Duration = Duration::from_secs(120);

/// Deadline for one CLI run in the end-to-end tests (`jemma generate` on a fixture, `jemma pull` from the
/// loopback Hub, the OpenAI SDK script).
pub const CMD_DEADLINE: Duration = Duration::from_secs(300);

/// A reqwest client whose every request is bounded by [`HTTP_DEADLINE`].
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HTTP_DEADLINE)
        .build()
        .expect("reqwest client")
}

/// Runs the Python check script `tests/e2e/<script>` with `args` (see tests/e2e/checks.py: one line per
/// check, "N passed, 0 failed" at the end) and panics on a failed check, quoting the `FAIL` line and the end
/// of stderr so that a CI summary that keeps only the panic still says which check failed.
pub fn check_script(script: &str, args: &[&str]) {
    let out = output_within(
        Command::new(python())
            .arg(root().join("tests/e2e").join(script))
            .args(args),
        CMD_DEADLINE,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    let tail: String = {
        let lines: Vec<&str> = stderr.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    };
    assert!(
        out.status.success() && stdout.contains(" passed, 0 failed"),
        "{script}: checks failed (exit {:?})\n{}\n{tail}",
        out.status.code(),
        failed.join("\n")
    );
}

/// Runs `cmd` to completion like [`Command::output`], but kills it and panics, naming the command, when it
/// runs past `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let what = format!("{:?}", cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    // Drain both pipes on threads: a child blocked on a full pipe would otherwise look like a hang.
    let drain = |p: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for child") {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// A `jemma serve` child process, killed on drop.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub _config: Option<tempfile::NamedTempFile>,
    /// Its stderr (warnings and errors), unless sent to a file: written out when it is dropped, from the
    /// test's thread, where the test harness captures it and shows it only if the test fails. Tests that
    /// inject faults make a server warn on purpose; a passing run's log should not read as a failure.
    log: Option<ServerLog>,
}

/// A child's stderr, read into `buf` by `drain` until the child closes it.
struct ServerLog {
    buf: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    drain: std::thread::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(ServerLog { buf, drain }) = self.log.take() {
            let _ = drain.join();
            let buf = buf
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !buf.is_empty() {
                eprintln!(
                    "--- the log of jemma serve {} ---\n{}",
                    self.url,
                    String::from_utf8_lossy(&buf)
                );
            }
        }
    }
}

impl Server {
    /// Starts `jemma serve --port 0 <args>` and waits for its "listening on" line and a ready /health.
    pub fn start(args: &[&str], config: Option<&str>) -> Server {
        Self::start_with(args, config, &[], None)
    }

    /// [`Server::start`] with extra environment variables and, optionally, stderr captured to a file.
    pub fn start_with(
        args: &[&str],
        config: Option<&str>,
        env: &[(&str, &str)],
        stderr_to: Option<&std::path::Path>,
    ) -> Server {
        let s = Self::spawn_with(args, config, env, stderr_to);
        s.wait_ready(Duration::from_secs(60));
        s
    }

    /// Starts `jemma serve` and returns once it listens, without waiting for its models.
    pub fn spawn_with(
        args: &[&str],
        config: Option<&str>,
        env: &[(&str, &str)],
        stderr_to: Option<&std::path::Path>,
    ) -> Server {
        let cfg = config.map(|c| {
            use std::io::Write;
            let mut f = tempfile::NamedTempFile::new().unwrap();
            f.write_all(c.as_bytes()).unwrap();
            f
        });
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jemma"));
        cmd.arg("serve");
        // A caller that names a port (a node restarted where its pool expects it) keeps it.
        if !args.contains(&"--port") {
            cmd.arg("--port").arg("0");
        }
        cmd.args(args);
        if let Some(f) = &cfg {
            cmd.arg("--config").arg(f.path());
        }
        cmd.env("JEMMA_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let stderr = match stderr_to {
            Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
            None => Stdio::piped(),
        };
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn jemma serve");
        let log = child.stderr.take().map(|mut err| {
            let buf = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
            let sink = buf.clone();
            let drain = std::thread::spawn(move || {
                use std::io::Read;
                let mut chunk = [0u8; 4096];
                while let Ok(n) = err.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .extend_from_slice(&chunk[..n]);
                }
            });
            ServerLog { buf, drain }
        });
        let stdout = child.stdout.take().unwrap();
        // The first line names the address; a server that never prints it must fail the test, not hang it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut r = BufReader::new(stdout);
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the child never blocks on a full pipe.
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        });
        let line = rx.recv_timeout(SPAWN_DEADLINE).unwrap_or_default();
        let url = line
            .trim()
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("http://"))
            .unwrap_or_default()
            .to_string();
        let server = Server {
            child,
            url,
            _config: cfg,
            log,
        };
        // Dropped while panicking, the server writes its log out: why it did not start.
        assert!(
            !server.url.is_empty(),
            "jemma serve printed no address: it exited, or took over {SPAWN_DEADLINE:?} (first line: \
             {line:?})"
        );
        server
    }

    pub fn wait_ready(&self, limit: Duration) {
        let t0 = Instant::now();
        loop {
            // Ready = serving and no local model still loading (a remote tier alone can make /health 200).
            if let Ok((200, body)) = ureq_get(&format!("{}/health", self.url)) {
                let loading = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["tiers"].as_object().cloned())
                    .map(|t| {
                        t.values().any(|t| {
                            t["backend"]["state"]
                                .as_str()
                                .is_some_and(|s| s.starts_with("loading"))
                        })
                    })
                    .unwrap_or(true);
                if !loading {
                    return;
                }
            }
            assert!(t0.elapsed() < limit, "{} did not become ready", self.url);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Minimal blocking GET (status, body) over loopback without pulling an HTTP client into the test.
pub fn ureq_get(url: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A simulated upstream's streamed answer in OpenAI SSE form: `pieces` as content deltas (`pause` after each),
/// then a final chunk with usage and `[DONE]` — or, with `drop_after`, an abrupt error after that many pieces
/// (the connection is torn down mid-stream).
pub fn sse_answer(
    pieces: &'static [&'static str],
    pause: std::time::Duration,
    drop_after: Option<usize>,
) -> axum::response::Response {
    use serde_json::json;
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        json!({"id": "sim", "object": "chat.completion.chunk", "created": 0, "model": "sim",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(8);
    tokio::spawn(async move {
        for (i, p) in pieces.iter().enumerate() {
            if tx
                .send(Ok(format!(
                    "data: {}\n\n",
                    chunk(json!({"content": p}), None)
                )))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(pause).await;
            if drop_after == Some(i + 1) {
                let _ = tx
                    .send(Err(std::io::Error::other("upstream crashed")))
                    .await;
                return;
            }
        }
        let mut fin = chunk(json!({}), Some("stop"));
        let n = pieces.len();
        fin["usage"] = json!({"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n});
        let _ = tx
            .send(Ok(format!("data: {fin}\n\ndata: [DONE]\n\n")))
            .await;
    });
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap()
}

/// POST `body` as JSON and parse the answer as JSON (test helper; panics on transport errors).
pub async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    let r = client.post(url).json(body).send().await.unwrap();
    r.json().await.unwrap()
}

/// POST `body` and return the JSON objects of the answer's SSE `data:` lines (`[DONE]` left out).
pub async fn post_sse(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> Vec<serde_json::Value> {
    let text = client.post(url).json(body).send().await.unwrap();
    let text = text.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

/// GET a URL's body as text (test helper; panics on transport errors).
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// A gateway under a 64 MiB memory limit whose primary tier is `primary` at `context_length` (too big
/// to fit) and whose fast tier is the tiny fixture; checks that primary was refused (unloaded, not
/// failed) and returns the server and its `/health`.
pub fn over_memory_limit(primary: &Path, context_length: usize) -> (Server, serde_json::Value) {
    let cfg = format!(
        "[memory]\nlimit = \"64MiB\"\npressure = \"off\"\n\
         [tiers.primary]\nmodel = \"{}\"\ncontext_length = {context_length}\n\
         [tiers.fast]\nmodel = \"{}\"\ncontext_length = 512\n",
        primary.display(),
        fixture("tiny").display()
    );
    let s = Server::start(&[], Some(&cfg));
    let h = health(&s);
    assert_eq!(tier(&h, "primary")["state"], "unloaded", "{h}");
    (s, h)
}

/// A server's `/health` as JSON.
pub fn health(s: &Server) -> serde_json::Value {
    let (_, body) = ureq_get(&format!("{}/health", s.url)).unwrap();
    serde_json::from_str(&body).unwrap()
}

/// One tier's backend object in a `/health` answer.
pub fn tier(h: &serde_json::Value, t: &str) -> serde_json::Value {
    h["tiers"][t]["backend"].clone()
}

/// Polls `f` every 50 ms until it holds; panics naming `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
