//! The OpenAI and Anthropic Python SDKs against the gateway: local tiers on the MLX engine, the heavy tier
//! through a second `jemma serve` upstream.

use std::process::Command;

use crate::support::{Server, fixture, python};

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

/// Images, audio and video with the OpenAI SDK (tests/e2e/openai_vision.py, openai_audio.py,
/// openai_video.py): the fast tier is the tiny model with vision and audio towers on the MLX engine, the
/// primary tier the tiny model without; the heavy tier shares the fast tier's engine and looks at only the
/// first 2 s of a video, in 2 frames.
#[test]
fn openai_python_sdk_sends_images_audio_and_video_to_a_model_that_takes_them() {
    let config = format!(
        "[limits]\nfetch_private_media_urls = true\n\
         [tiers.fast]\nmodel = \"{mm}\"\n[tiers.primary]\nmodel = \"{}\"\n\
         [tiers.heavy]\nkind = \"local\"\nenabled = true\nmodel = \"{mm}\"\nvideo_frames = 2\nvideo_seconds = 2.0\n",
        fixture("tiny").display(),
        mm = fixture("tiny-mm").display(),
    );
    let gw = Server::start(&[], Some(&config));
    sdk_script("openai_vision.py", &gw.url);
    sdk_script("openai_audio.py", &gw.url);
    sdk_script("openai_video.py", &gw.url);
    // The default limits: image and video URLs may not reach this machine (no SSRF through the gateway).
    let guarded = Server::start(
        &[],
        Some(&format!(
            "[tiers.fast]\nmodel = \"{}\"\n",
            fixture("tiny-mm").display()
        )),
    );
    sdk_script("openai_ssrf.py", &guarded.url);
}

/// Runs one of the SDK scripts in tests/e2e against `url`; fails on its first failed check.
fn sdk_script(script: &str, url: &str) {
    crate::support::check_script(script, &[url]);
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
    crate::support::check_script("openai_batching.py", &[&s.url, "mlx"]);
}

/// Speculative decoding end to end with the OpenAI Python SDK (tests/e2e/openai_speculative.py): a gateway
/// whose tier drafts with the tiny fixture's 4-bit copy answers greedy requests with exactly the text of one
/// that does not, and reports the rounds in `_routing`, `/health` and `/metrics`.
#[test]
fn speculative_decoding_answers_as_plain_decoding_through_the_sdk() {
    let spec = format!(
        "[tiers.fast]\nmodel = \"{}\"\ncontext_length = 2048\n[tiers.fast.speculative]\ndraft_model = \"{}\"\n\
         adaptive = false\n",
        fixture("tiny").display(),
        fixture("tiny-q4").display()
    );
    let plain = format!(
        "[tiers.fast]\nmodel = \"{}\"\ncontext_length = 2048\n",
        fixture("tiny").display()
    );
    let s = Server::start(&[], Some(&spec));
    let p = Server::start(&[], Some(&plain));
    crate::support::check_script("openai_speculative.py", &[&s.url, &p.url]);
}

/// The same on GGUF tiers (the llama.cpp engine): the tiny fixture's float32 GGUF drafted by its Q8_0
/// conversion.
#[test]
fn speculative_decoding_on_a_gguf_tier_answers_as_plain_decoding_through_the_sdk() {
    let gguf = |n: &str| fixture("tiny").join("../gguf").join(n);
    let target = gguf("tiny-f32.gguf");
    let spec = format!(
        "[tiers.fast]\nmodel = \"{}\"\ncontext_length = 2048\n[tiers.fast.speculative]\ndraft_model = \"{}\"\n\
         adaptive = false\n",
        target.display(),
        gguf("tiny-q8_0.gguf").display()
    );
    let plain = format!(
        "[tiers.fast]\nmodel = \"{}\"\ncontext_length = 2048\n",
        target.display()
    );
    let s = Server::start(&[], Some(&spec));
    let p = Server::start(&[], Some(&plain));
    crate::support::check_script("openai_speculative.py", &[&s.url, &p.url, "tiny-q8_0.gguf"]);
}

/// The same over quantized KV caches, on both engines: an MLX tier with `kv_bits = 8` from the first
/// position (drafting with a draft model, and with the MTP assistant, which reads the quantized cache),
/// and a GGUF tier with `cache_type_k`/`cache_type_v = "q8_0"`, each against a plain tier with the same
/// cache.
#[test]
fn speculation_over_quantized_kv_caches_answers_as_plain_decoding_through_the_sdk() {
    let gguf = |n: &str| fixture("tiny").join("../gguf").join(n);
    for (target, draft, cache) in [
        (
            fixture("tiny"),
            fixture("tiny-q4"),
            "kv_bits = 8\nquantized_kv_start = 0\n",
        ),
        (
            fixture("tiny"),
            fixture("mtp"),
            "kv_bits = 8\nquantized_kv_start = 0\n",
        ),
        (
            gguf("tiny-q8_0.gguf"),
            gguf("tiny-f32.gguf"),
            "cache_type_k = \"q8_0\"\ncache_type_v = \"q8_0\"\n",
        ),
    ] {
        let plain = format!(
            "[tiers.fast]\nmodel = \"{}\"\ncontext_length = 2048\n{cache}",
            target.display()
        );
        let spec = format!(
            "{plain}[tiers.fast.speculative]\ndraft_model = \"{}\"\nadaptive = false\n",
            draft.display()
        );
        let s = Server::start(&[], Some(&spec));
        let p = Server::start(&[], Some(&plain));
        let name = draft.file_name().unwrap().to_string_lossy().into_owned();
        let mut args = vec![s.url.as_str(), p.url.as_str()];
        if name.ends_with(".gguf") || name == "mtp" {
            args.push(&name);
        }
        if name == "mtp" {
            args.push("mtp_assistant");
        }
        crate::support::check_script("openai_speculative.py", &args);
    }
}

/// The same with the Gemma 4 assistant (MTP) drafter on a GGUF tier, found by itself: beside the model in
/// its directory, named as its drafter (`tiny-it.gguf` → `tiny-it-assistant-f32.gguf`, the tied-head
/// fixture converted by llama.cpp's converter), passing over a GGUF named so that is no assistant;
/// `/health` names the drafter `mtp_assistant`.
#[test]
fn mtp_assistant_found_beside_a_gguf_answers_as_plain_decoding_through_the_sdk() {
    let gguf = |n: &str| fixture("tiny").join("../gguf").join(n);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("tiny-it.gguf");
    std::os::unix::fs::symlink(gguf("tiny-f32.gguf"), &target).unwrap();
    std::os::unix::fs::symlink(
        gguf("mtp-tied-f32.gguf"),
        dir.path().join("tiny-it-assistant-f32.gguf"),
    )
    .unwrap();
    // A GGUF named as a drafter but not an assistant is passed over.
    std::os::unix::fs::symlink(
        gguf("tiny-q8_0.gguf"),
        dir.path().join("tiny-it-assistant-0-not.gguf"),
    )
    .unwrap();
    let spec = format!(
        "[tiers.fast]\nmodel = \"{}\"\ncontext_length = 2048\n[tiers.fast.speculative]\nadaptive = false\n",
        target.display()
    );
    let plain = format!(
        "[tiers.fast]\nmodel = \"{}\"\ncontext_length = 2048\n[tiers.fast.speculative]\nenabled = false\n",
        target.display()
    );
    let s = Server::start(&[], Some(&spec));
    let p = Server::start(&[], Some(&plain));
    crate::support::check_script(
        "openai_speculative.py",
        &[
            &s.url,
            &p.url,
            "tiny-it-assistant-f32.gguf",
            "mtp_assistant",
        ],
    );
}

/// Images, audio and video on a GGUF tier with the OpenAI SDK (tests/e2e/openai_gguf_media.py): the
/// multimodal fixture's GGUF with its towers as an mmproj GGUF (llama.cpp's libmtmd), checked against the
/// same weights on the MLX engine in the same gateway (which samples videos as the GGUF tier does); a GGUF
/// tier without an mmproj refuses media.
#[test]
fn openai_python_sdk_sends_images_audio_and_video_to_a_gguf_tier_with_an_mmproj() {
    let gguf = |n: &str| fixture("tiny").join("../gguf").join(n);
    let config = format!(
        "[tiers.fast]\nmodel = \"{}\"\nmmproj = \"{}\"\nimage_tokens = 16\nvideo_tokens = 4\ncontext_length = 1024\n\
         [tiers.primary]\nmodel = \"{}\"\nvideo_frames = 4\nvideo_seconds = 30.0\n\
         [tiers.heavy]\nkind = \"local\"\nenabled = true\nmodel = \"{}\"\ncontext_length = 1024\n",
        gguf("tiny-mm-f32.gguf").display(),
        gguf("mmproj-tiny-mm-f32.gguf").display(),
        fixture("tiny-mm").display(),
        gguf("tiny-f32.gguf").display()
    );
    let gw = Server::start(&[], Some(&config));
    sdk_script("openai_gguf_media.py", &gw.url);
}

/// Property-based fuzzing of the whole HTTP surface from its own description: schemathesis reads
/// `/openapi.json` and sends what it describes (and what it does not) to every operation of a gateway on
/// the tiny Gemma 4 fixture. No answer may be a 5xx, and every answer must match the description — its
/// status, content type and body schema. The run is bounded (examples per operation, a fixed seed so a
/// failure reproduces with `st run --seed`) and the tier's answers short (`max_tokens` at most 2, also the
/// default).
#[test]
fn schemathesis_finds_no_server_error_and_no_answer_off_the_description() {
    let tiny = fixture("tiny");
    let config = format!(
        "[limits]\nmax_tokens_ceiling = 2\ndefault_max_tokens = 2\n\
         [tiers.fast]\nmodel = \"{m}\"\ncontext_length = 512\n\
         [tiers.primary]\nmodel = \"{m}\"\ncontext_length = 512\n",
        m = tiny.display()
    );
    let gw = Server::start(&[], Some(&config));
    let st = python().with_file_name("st");
    let out = crate::support::output_within(
        Command::new(st)
            .args(["run", &format!("{}/openapi.json", gw.url)])
            .args([
                "--checks",
                "not_a_server_error,response_schema_conformance,status_code_conformance,\
                 content_type_conformance,response_headers_conformance",
                "--max-examples",
                "40",
                "--workers",
                "1",
                "--seed",
                "20261201",
                "--no-color",
            ])
            // Hypothesis keeps its example database in the working directory: not in the checkout.
            .current_dir(std::env::temp_dir()),
        crate::support::CMD_DEADLINE,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found failures");
    // The run reached the model: some chat answers were generated, not only refusals.
    let metrics = crate::support::ureq_get(&format!("{}/metrics", gw.url))
        .expect("metrics")
        .1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("jemma_requests_total") && l.contains("status=\"ok\"")),
        "no fuzzed request was answered by a tier:\n{metrics}"
    );
}
