//! The OpenAI and Anthropic Python SDKs against the gateway: local tiers on the MLX engine, the heavy tier
//! through a second `jemma serve` upstream.

use std::process::Command;

use crate::support::{Server, fixture, python, root};

#[test]
fn openai_python_sdk_drives_the_gateway() {
    let tiny = fixture("tiny");
    let upstream = Server::start(&["--model", tiny.to_str().unwrap()], None);
    let config = format!(
        r#"
[tiers.fast]
model = "{m}"
[tiers.primary]
model = "{m}"
[tiers.heavy]
kind = "openai"
url = "{u}"
model = "fast"
first_token_timeout_secs = 60
"#,
        m = tiny.display(),
        u = upstream.url
    );
    let gw = Server::start(&[], Some(&config));
    sdk_script("openai_sdk.py", &gw.url);
    // The same tiers through Anthropic's Messages API, with Anthropic's own SDK.
    sdk_script("anthropic_sdk.py", &gw.url);
}

/// Runs one of the SDK scripts in tests/e2e against `url`; fails on its first failed check.
fn sdk_script(script: &str, url: &str) {
    let out = crate::support::output_within(
        Command::new(python())
            .arg(root().join("tests/e2e").join(script))
            .arg(url),
        crate::support::CMD_DEADLINE,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script}: checks failed");
    assert!(stdout.contains(" passed, 0 failed"), "{script}");
}

/// Continuous batching on the MLX engine end to end with the OpenAI Python SDK (tests/e2e/openai_batching.py
/// in its `mlx` mode): on the tiny Gemma 4 fixture, 8 concurrent greedy streams all complete, run several at
/// once, and each equals its lone answer; a new chat with an earlier chat's system prompt reports the
/// system prompt's tokens as cached.
#[test]
fn eight_concurrent_openai_streams_batch_on_the_mlx_engine() {
    let config = format!(
        "[tiers.fast]\nmodel = \"{}\"\ncontext_length = 2048\nmax_concurrency = 8\n",
        fixture("tiny").display()
    );
    let s = Server::start(&[], Some(&config));
    let out = crate::support::output_within(
        Command::new(python())
            .arg(root().join("tests/e2e/openai_batching.py"))
            .arg(&s.url)
            .arg("mlx"),
        crate::support::CMD_DEADLINE,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "OpenAI SDK batching checks failed");
    assert!(stdout.contains(" passed, 0 failed"));
}
