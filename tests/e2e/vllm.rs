//! The heavy tier's vLLM variant as it is deployed, on loopback: `cloud/heavy/vllm/entrypoint.sh` itself
//! (its key check, flags, parsers and route allowlist) starting a real vLLM 0.32.0 — the release the
//! variant's Dockerfile deploys, here its CPU build (scripts/setup-vllm.sh) — on the tiny Gemma 4 fixture,
//! and a Jemma gateway whose heavy tier is that server, with its bearer key. The checks, with the OpenAI
//! Python SDK, are tests/e2e/openai_vllm.py: what scripts/lint-cloud.sh checks with a stand-in `vllm` and the
//! router's unit tests check against recordings, here against the server itself.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Server, fixture, jemma_cache, root, ureq_get};

/// The venv scripts/setup-vllm.sh makes, in the user's cache.
fn vllm_venv() -> PathBuf {
    let venv = jemma_cache().join("vllm-venv");
    assert!(
        venv.join("bin/vllm").exists(),
        "{} missing: run scripts/setup-vllm.sh",
        venv.display()
    );
    venv
}

/// The deployed entrypoint running vLLM, in a process group of its own (vLLM's engine runs in a child
/// process), stopped with the group when dropped; its log printed if the test failed.
struct Vllm {
    child: Child,
    url: String,
    key: String,
    log: tempfile::NamedTempFile,
}

impl Drop for Vllm {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("--- the log of vLLM {} ---\n{}", self.url, tail.join("\n"));
        }
    }
}

impl Vllm {
    /// Runs `cloud/heavy/vllm/entrypoint.sh` as Cloud Run would (`HEAVY_API_KEY`, `PORT`, `MODEL`) on the
    /// tiny fixture, with the vLLM venv first on `PATH`, no network (`HF_HUB_OFFLINE`), 1 GiB of KV cache;
    /// waits for `/health` (fails at once if it exits, and after 300 s).
    fn start() -> Vllm {
        let venv = vllm_venv();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let key = format!("heavy-key-{}", std::process::id());
        let log = tempfile::NamedTempFile::new().unwrap();
        let path = format!(
            "{}:{}",
            venv.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("sh");
        cmd.arg(root().join("cloud/heavy/vllm/entrypoint.sh"))
            .env("PATH", path)
            .env("HEAVY_API_KEY", &key)
            .env("PORT", port.to_string())
            .env("MODEL", fixture("tiny"))
            // The image copies jemma_allowlist.py to /opt/jemma, which the entrypoint puts first on
            // PYTHONPATH; here it is read where it is.
            .env("PYTHONPATH", root().join("cloud/heavy/vllm"))
            .env("VLLM_TARGET_DEVICE", "cpu")
            .env("VLLM_CPU_KVCACHE_SPACE", "1")
            .env("VLLM_NO_USAGE_STATS", "1")
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("spawn cloud/heavy/vllm/entrypoint.sh");
        let mut v = Vllm {
            child,
            url: format!("http://127.0.0.1:{port}"),
            key,
            log,
        };
        let t0 = Instant::now();
        loop {
            if matches!(ureq_get(&format!("{}/health", v.url)), Ok((200, _))) {
                break;
            }
            if let Ok(Some(status)) = v.child.try_wait() {
                panic!("vLLM exited ({status}) before it was ready");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "vLLM not ready within 300 s"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        v
    }
}

/// The deployed vLLM variant behind the gateway's heavy tier: the entrypoint's guards, the dialect learned
/// from its `/v1/models` and every field Jemma sends it under vLLM's names answered as vLLM answers it
/// directly (sampling fields, the thinking switch and budget, structured output, a forced tool call,
/// streaming, logprobs, completions).
#[test]
fn the_deployed_vllm_variant_serves_the_heavy_tier() {
    let upstream = Vllm::start();
    let cfg = format!(
        "[tiers.fast]\nmodel = \"{}\"\n[tiers.heavy]\nkind = \"openai\"\nurl = \"{}/v1\"\n\
         model = \"gemma-4-26b-a4b\"\napi_key = \"{}\"\n",
        fixture("tiny").display(),
        upstream.url,
        upstream.key
    );
    let gw = Server::start(&[], Some(&cfg));
    crate::support::check_script(
        "openai_vllm.py",
        &[
            &gw.url,
            &upstream.url,
            &upstream.key,
            upstream.log.path().to_str().unwrap(),
            fixture("tiny").to_str().unwrap(),
        ],
    );
}
