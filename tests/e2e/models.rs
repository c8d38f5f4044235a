//! Models on the real `jemma` binary: `jemma pull` and `jemma serve` downloading from a loopback Hub (real
//! HTTP, the real hf-hub client), the footprint estimate against MLX's measured peak, idle and
//! memory-pressure unloading seen through `/health` and the process RSS, refusal under a memory limit, and
//! swapping a tier's model while the gateway runs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::fake_hub::{self, FakeRepo};
use crate::support::{Server, fixture, health, tier, wait_for};

async fn chat(client: &reqwest::Client, s: &Server, model: &str) -> (u16, Value) {
    let r = client
        .post(format!("{}/v1/chat/completions", s.url))
        .json(&json!({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello!"}]}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// A fake Hub with no repos yet, on a runtime of its own (kept alive by the caller): the runtime, the Hub's
/// URL and its repos.
fn fake_hub_on_runtime() -> (
    tokio::runtime::Runtime,
    String,
    std::sync::Arc<fake_hub::Hub>,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (url, hub) = rt.block_on(fake_hub::start());
    (rt, url, hub)
}

/// A fake Hub serving the `tiny` fixture as `jemma-test/gemma-4-tiny` and its MTP drafter fixture as
/// `jemma-test/gemma-4-tiny-it-assistant`, and a catalog naming both (the model paired with the drafter).
fn hub_with_tiny(throttle_ms: u64) -> (tokio::runtime::Runtime, String, tempfile::TempDir) {
    let (rt, url, hub) = fake_hub_on_runtime();
    for (repo_id, dir) in [
        ("jemma-test/gemma-4-tiny", "tiny"),
        ("jemma-test/gemma-4-tiny-it-assistant", "mtp"),
    ] {
        let mut repo = FakeRepo {
            commit: "1111111111111111111111111111111111111111".into(),
            ..Default::default()
        };
        for e in std::fs::read_dir(fixture(dir)).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("reference") {
                repo.files.insert(name, std::fs::read(e.path()).unwrap());
            }
        }
        repo.files
            .insert("README.md".into(), b"not pulled".to_vec());
        hub.repos.lock().unwrap().insert(repo_id.into(), repo);
    }
    *hub.throttle_ms.lock().unwrap() = throttle_ms;
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("models.toml"),
        "[models.test-tiny]\ntier = \"fast\"\nformat = \"mlx\"\nrepo = \"jemma-test/gemma-4-tiny\"\n\
         drafter = \"test-tiny-assistant\"\n\
         download_bytes = 6000000\nmemory_bytes = 10000000\nmin_free_bytes = 20000000\n\
         [models.test-tiny-assistant]\ntier = \"draft\"\nformat = \"mlx\"\n\
         repo = \"jemma-test/gemma-4-tiny-it-assistant\"\n\
         download_bytes = 500000\nmemory_bytes = 1000000\nmin_free_bytes = 1000000\n\
         [models.test-lonely]\ntier = \"fast\"\nformat = \"mlx\"\n\
         repo = \"jemma-test/gemma-4-tiny-it-assistant\"\n\
         drafter = \"test-missing-assistant\"\n\
         [models.test-missing-assistant]\ntier = \"draft\"\nformat = \"mlx\"\n\
         repo = \"jemma-test/not-on-the-hub\"\n",
    )
    .unwrap();
    (rt, url, home)
}

/// The drafter `/health` reports for a tier (None: it does not speculate).
fn drafter(h: &Value, t: &str) -> Option<String> {
    tier(h, t)["details"]["speculative"]["draft_model"]
        .as_str()
        .map(str::to_string)
}

fn hub_env<'a>(url: &'a str, home: &'a Path) -> Vec<(&'static str, String)> {
    vec![
        ("HF_ENDPOINT", url.to_string()),
        ("HF_HOME", home.join("hf").to_string_lossy().into_owned()),
        (
            "JEMMA_CATALOG",
            home.join("models.toml").to_string_lossy().into_owned(),
        ),
        ("HF_TOKEN", String::new()),
    ]
}

#[test]
fn jemma_pull_downloads_into_the_hf_cache_with_progress() {
    let (_rt, url, home) = hub_with_tiny(0);
    let out = crate::support::output_within(
        Command::new(env!("CARGO_BIN_EXE_jemma"))
            .args(["pull", "test-tiny", "--json"])
            .envs(hub_env(&url, home.path()))
            .env("JEMMA_LOG", "warn"),
        crate::support::CMD_DEADLINE,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let progress: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("done_bytes").is_some() && l["model"] == "test-tiny")
        .collect();
    assert!(progress.len() > 3, "{stdout}");
    let total = progress[0]["total_bytes"].as_u64().unwrap();
    assert!(
        progress
            .windows(2)
            .all(|w| w[0]["done_bytes"].as_u64() <= w[1]["done_bytes"].as_u64())
    );
    assert_eq!(progress.last().unwrap()["done_bytes"].as_u64(), Some(total));
    // The model, then the drafter the catalog pairs it with.
    let done: Vec<&Value> = lines.iter().filter(|l| l["done"] == true).collect();
    assert_eq!(done.len(), 2, "{stdout}");
    assert_eq!(done[1]["model"], "test-tiny-assistant");
    assert!(
        done[1]["path"].as_str().unwrap().starts_with(
            home.path()
                .join("hf/hub/models--jemma-test--gemma-4-tiny-it-assistant/snapshots")
                .to_str()
                .unwrap()
        ),
        "{stdout}"
    );
    let path = done[0]["path"].as_str().unwrap().to_string();
    assert!(
        path.starts_with(
            home.path()
                .join("hf/hub/models--jemma-test--gemma-4-tiny/snapshots")
                .to_str()
                .unwrap()
        )
    );
    for f in [
        "config.json",
        "tokenizer.json",
        "model-00001-of-00003.safetensors",
    ] {
        assert_eq!(
            std::fs::read(Path::new(&path).join(f)).unwrap(),
            std::fs::read(fixture("tiny").join(f)).unwrap()
        );
    }
    assert!(!Path::new(&path).join("README.md").exists());
    // The pulled snapshot is a model the engine serves; `pull --list` sees it without the network.
    let list = crate::support::output_within(
        Command::new(env!("CARGO_BIN_EXE_jemma"))
            .args(["pull", "--list"])
            .envs(hub_env("http://127.0.0.1:9", home.path())),
        crate::support::CMD_DEADLINE,
    );
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.lines()
            .any(|l| l.starts_with("test-tiny") && l.contains("[downloaded")),
        "{list}"
    );
    // A drafter the Hub lacks is a warning: its model downloaded, and serves without it.
    let out = crate::support::output_within(
        Command::new(env!("CARGO_BIN_EXE_jemma"))
            .args(["pull", "test-lonely", "--json"])
            .envs(hub_env(&url, home.path())),
        crate::support::CMD_DEADLINE,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("\"warning\"") && stdout.contains("test-missing-assistant"),
        "{stdout}"
    );
    // Unknown repos fail with the Hub's answer and a non-zero exit.
    let bad = crate::support::output_within(
        Command::new(env!("CARGO_BIN_EXE_jemma"))
            .args(["pull", "jemma-test/missing"])
            .envs(hub_env(&url, home.path())),
        crate::support::CMD_DEADLINE,
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not found"));
}

#[test]
fn serve_downloads_a_missing_model_showing_progress_then_serves_it() {
    let (rt, url, home) = hub_with_tiny(25);
    let env = hub_env(&url, home.path());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cfg = "[memory]\npressure = \"off\"\n[tiers.fast]\nmodel = \"test-tiny\"\n";
    let s = Server::spawn_with(&[], Some(cfg), &env, None);
    let mut seen = vec![];
    wait_for(
        "the download to finish and the model to load",
        Duration::from_secs(90),
        || {
            let h = health(&s);
            let state = tier(&h, "fast")["state"].as_str().unwrap_or("").to_string();
            if state.starts_with("downloading") {
                assert_eq!(h["status"], "starting", "{h}");
            }
            if seen.last() != Some(&state) {
                seen.push(state.clone());
            }
            state == "ready"
        },
    );
    let partial = seen.iter().any(|s| {
        s.strip_prefix("downloading ")
            .and_then(|p| p.trim_end_matches('%').parse::<u32>().ok())
            .is_some_and(|p| p > 0 && p < 100)
    });
    assert!(partial, "saw a partial download percentage: {seen:?}");
    // The catalog's drafter came with the model, and the tier speculates with it without being told.
    let h = health(&s);
    let d = drafter(&h, "fast").unwrap_or_else(|| panic!("no drafter: {h}"));
    assert!(
        d.contains("models--jemma-test--gemma-4-tiny-it-assistant"),
        "{d}"
    );
    assert_eq!(
        tier(&h, "fast")["details"]["speculative"]["drafter"],
        "mtp_assistant"
    );
    // An instruction-tuned checkpoint with its chat template: the tier chats (`model: auto` routes by it).
    assert_eq!(tier(&h, "fast")["chat"], true, "{h}");
    let client = crate::support::client();
    let (code, body) = rt.block_on(chat(&client, &s, "fast"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["_routing"]["model"], "test-tiny");
    // The model landed in the standard cache, where the next start finds it (and its drafter) without the
    // Hub; `enabled = false` turns the found drafter off.
    drop(s);
    let offline = hub_env("http://127.0.0.1:9", home.path());
    let offline: Vec<(&str, &str)> = offline.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = Server::start_with(&[], Some(cfg), &offline, None);
    let h = health(&s);
    assert_eq!(tier(&h, "fast")["state"], "ready");
    assert_eq!(drafter(&h, "fast"), Some(d));
    drop(s);
    let off = format!("{cfg}[tiers.fast.speculative]\nenabled = false\n");
    let s = Server::start_with(&[], Some(&off), &offline, None);
    assert_eq!(drafter(&health(&s), "fast"), None);
}

/// `jemma pull` fetches the mmproj the catalog pairs with a GGUF model (its vision and audio towers), and
/// a tier serving that model takes images and audio through it without being told where it is: found
/// through the catalog, since the snapshot also holds another model of the repo (so "the one mmproj beside
/// the model" cannot say), whose tier stays text-only.
#[test]
fn jemma_pull_fetches_a_gguf_models_mmproj_and_its_tier_takes_media() {
    let (_rt, url, hub) = fake_hub_on_runtime();
    let mut repo = FakeRepo {
        commit: "2222222222222222222222222222222222222222".into(),
        ..Default::default()
    };
    let gguf = fixture("tiny").join("../gguf");
    for f in [
        "tiny-mm-f32.gguf",
        "mmproj-tiny-mm-f32.gguf",
        "tiny-f32.gguf",
    ] {
        repo.files
            .insert(f.into(), std::fs::read(gguf.join(f)).unwrap());
    }
    hub.repos
        .lock()
        .unwrap()
        .insert("jemma-test/gemma-4-tiny-GGUF".into(), repo);
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("models.toml"),
        "[models.test-mm-gguf]\ntier = \"fast\"\nformat = \"gguf\"\nrepo = \"jemma-test/gemma-4-tiny-GGUF\"\n\
         file = \"tiny-mm-f32.gguf\"\nmmproj = \"mmproj-tiny-mm-f32.gguf\"\n\
         [models.test-text-gguf]\ntier = \"primary\"\nformat = \"gguf\"\n\
         repo = \"jemma-test/gemma-4-tiny-GGUF\"\nfile = \"tiny-f32.gguf\"\n",
    )
    .unwrap();
    let out = crate::support::output_within(
        Command::new(env!("CARGO_BIN_EXE_jemma"))
            .args(["pull", "test-mm-gguf", "test-text-gguf", "--json"])
            .envs(hub_env(&url, home.path()))
            .env("JEMMA_LOG", "warn"),
        crate::support::CMD_DEADLINE,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let done: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["done"] == true)
        .collect();
    assert_eq!(done.len(), 3, "the two models and one mmproj: {stdout}");
    assert!(
        done[1]["mmproj"].as_str().unwrap().ends_with(
            "snapshots/2222222222222222222222222222222222222222/mmproj-tiny-mm-f32.gguf"
        ),
        "{stdout}"
    );
    let offline = hub_env("http://127.0.0.1:9", home.path());
    let offline: Vec<(&str, &str)> = offline.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cfg = "[memory]\npressure = \"off\"\n[tiers.fast]\nmodel = \"test-mm-gguf\"\nimage_tokens = 16\n\
               context_length = 1024\n[tiers.primary]\nmodel = \"test-text-gguf\"\ncontext_length = 1024\n";
    let s = Server::start_with(&[], Some(cfg), &offline, None);
    let h = health(&s);
    assert_eq!(
        tier(&h, "fast")["input_modalities"],
        json!(["text", "image", "audio", "video"]),
        "{h}"
    );
    assert_eq!(
        tier(&h, "primary")["input_modalities"],
        json!(["text"]),
        "{h}"
    );
    drop(s);
    // `jemma serve` downloading the missing model fetches its mmproj too.
    let fresh = tempfile::tempdir().unwrap();
    std::fs::copy(
        home.path().join("models.toml"),
        fresh.path().join("models.toml"),
    )
    .unwrap();
    let env = hub_env(&url, fresh.path());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = Server::spawn_with(&[], Some(cfg), &env, None);
    wait_for("the download and the load", Duration::from_secs(90), || {
        tier(&health(&s), "fast")["state"] == "ready"
    });
    assert_eq!(
        tier(&health(&s), "fast")["input_modalities"],
        json!(["text", "image", "audio", "video"])
    );
}

/// A GGUF repo's assistant drafter comes with its model by llama.cpp's sidecar convention (`mtp-…gguf`,
/// what `llama-server -hf` fetches): `jemma pull` fetches the sidecar llama.cpp would pick (beside the
/// model, the quantization closest to the model's: not the Q8_0 one, nor one in another directory), and a
/// tier serving the model speculates with it without being told, offline; a model in a subdirectory whose
/// own sidecar is no assistant finds the one at its snapshot's root; `jemma serve` downloading the model
/// fetches it too; `--no-drafters` leaves it.
#[test]
fn jemma_pull_fetches_a_gguf_repos_mtp_sidecar_and_its_tier_speculates() {
    let (_rt, url, hub) = fake_hub_on_runtime();
    let mut repo = FakeRepo {
        commit: "3333333333333333333333333333333333333333".into(),
        ..Default::default()
    };
    let gguf = fixture("tiny").join("../gguf");
    for (name, f) in [
        ("gemma-4-tiny-it-F32.gguf", "tiny-f32.gguf"),
        ("mtp-gemma-4-tiny-it-F32.gguf", "mtp-tied-f32.gguf"),
        ("mtp-gemma-4-tiny-it-Q8_0.gguf", "mtp-echo-f32.gguf"),
        ("Q8_0/mtp-gemma-4-tiny-it-F32.gguf", "mtp-echo-f32.gguf"),
        // A model in a subdirectory, whose nearest sidecar (its own tag) is no assistant.
        ("Q8_0/gemma-4-tiny-it-Q8_0.gguf", "tiny-q8_0.gguf"),
        ("Q8_0/mtp-gemma-4-tiny-it-Q8_0.gguf", "tiny-f32.gguf"),
    ] {
        repo.files
            .insert(name.into(), std::fs::read(gguf.join(f)).unwrap());
    }
    hub.repos
        .lock()
        .unwrap()
        .insert("jemma-test/gemma-4-tiny-it-GGUF".into(), repo);
    let catalog = "[models.test-gguf]\ntier = \"fast\"\nformat = \"gguf\"\n\
                   repo = \"jemma-test/gemma-4-tiny-it-GGUF\"\nfile = \"gemma-4-tiny-it-F32.gguf\"\n";
    let pull = |home: &Path, model: &str, extra: &[&str]| {
        let out = crate::support::output_within(
            Command::new(env!("CARGO_BIN_EXE_jemma"))
                .args(["pull", model, "--json"])
                .args(extra)
                .envs(hub_env(&url, home))
                .env("JEMMA_LOG", "warn"),
            crate::support::CMD_DEADLINE,
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stdout}");
        stdout
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|l| l["done"] == true)
            .collect::<Vec<Value>>()
    };
    let snapshot = "snapshots/3333333333333333333333333333333333333333";
    // --no-drafters: the model alone.
    let bare = tempfile::tempdir().unwrap();
    std::fs::write(bare.path().join("models.toml"), catalog).unwrap();
    let done = pull(bare.path(), "test-gguf", &["--no-drafters"]);
    assert_eq!(done.len(), 1, "{done:?}");
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("models.toml"), catalog).unwrap();
    let done = pull(home.path(), "test-gguf", &[]);
    assert_eq!(done.len(), 2, "the model and its drafter: {done:?}");
    let side = done[1]["drafter"].as_str().unwrap().to_string();
    assert!(
        side.ends_with(&format!("{snapshot}/mtp-gemma-4-tiny-it-F32.gguf")),
        "{side}"
    );
    let model_dir = Path::new(&side).parent().unwrap().to_path_buf();
    assert!(!model_dir.join("mtp-gemma-4-tiny-it-Q8_0.gguf").exists());
    assert!(!model_dir.join("Q8_0").exists());
    let cfg =
        "[memory]\npressure = \"off\"\n[tiers.fast]\nmodel = \"test-gguf\"\ncontext_length = 512\n";
    let offline = hub_env("http://127.0.0.1:9", home.path());
    let offline: Vec<(&str, &str)> = offline.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = Server::start_with(&[], Some(cfg), &offline, None);
    let h = health(&s);
    assert_eq!(drafter(&h, "fast").as_deref(), Some(side.as_str()), "{h}");
    assert_eq!(
        tier(&h, "fast")["details"]["speculative"]["drafter"],
        "mtp_assistant"
    );
    drop(s);
    // The model in the subdirectory: its own sidecar comes down (llama.cpp's pick: the nearest, with its
    // tag), but it is no assistant, so its tier passes it over for the one at the snapshot's root.
    let sub = format!(
        "{catalog}[models.test-gguf-sub]\ntier = \"fast\"\nformat = \"gguf\"\n\
         repo = \"jemma-test/gemma-4-tiny-it-GGUF\"\nfile = \"Q8_0/gemma-4-tiny-it-Q8_0.gguf\"\n"
    );
    std::fs::write(home.path().join("models.toml"), &sub).unwrap();
    let done = pull(home.path(), "test-gguf-sub", &[]);
    assert_eq!(
        done.len(),
        2,
        "the model in Q8_0/ and its sidecar: {done:?}"
    );
    assert!(
        model_dir
            .join("Q8_0/mtp-gemma-4-tiny-it-Q8_0.gguf")
            .exists()
    );
    let sub_cfg = cfg.replace("\"test-gguf\"", "\"test-gguf-sub\"");
    let s = Server::start_with(&[], Some(&sub_cfg), &offline, None);
    assert_eq!(drafter(&health(&s), "fast").as_deref(), Some(side.as_str()));
    drop(s);
    // Without the sidecar on disk, the same tier decodes plainly.
    let offline = hub_env("http://127.0.0.1:9", bare.path());
    let offline: Vec<(&str, &str)> = offline.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = Server::start_with(&[], Some(cfg), &offline, None);
    assert_eq!(drafter(&health(&s), "fast"), None);
    drop(s);
    // `jemma serve` downloading the missing model fetches its sidecar too.
    let fresh = tempfile::tempdir().unwrap();
    std::fs::write(fresh.path().join("models.toml"), catalog).unwrap();
    let env = hub_env(&url, fresh.path());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let s = Server::spawn_with(&[], Some(cfg), &env, None);
    wait_for("the download and the load", Duration::from_secs(90), || {
        tier(&health(&s), "fast")["state"] == "ready"
    });
    let d = drafter(&health(&s), "fast").unwrap_or_default();
    assert!(
        d.ends_with(&format!("{snapshot}/mtp-gemma-4-tiny-it-F32.gguf")),
        "{d}"
    );
}

/// A model directory outside the Hub cache finds the assistant drafter beside it by its name
/// (`<model up to -it>-it-assistant…`) and its config (drafting for this model); other directories,
/// and drafters for another model, are passed over.
#[test]
fn a_drafter_beside_a_model_directory_is_found_by_name_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let link = |from: &str, to: &str| {
        std::os::unix::fs::symlink(fixture(from), dir.path().join(to)).unwrap();
    };
    link("tiny", "gemma-4-tiny-it-4bit");
    link("tiny-q4", "gemma-4-tiny-it-8bit");
    link("mtp", "gemma-4-tiny-it-assistant-bf16");
    // Named as its drafter and sorted first, but made for a wider model.
    let decoy = dir.path().join("gemma-4-tiny-it-assistant-a");
    std::fs::create_dir(&decoy).unwrap();
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(fixture("mtp").join("config.json")).unwrap())
            .unwrap();
    cfg["backbone_hidden_size"] = json!(512);
    std::fs::write(decoy.join("config.json"), cfg.to_string()).unwrap();
    let config = jemma_router::config::Config::parse(&format!(
        "[models]\ncache_dir = \"{}\"\n",
        dir.path().join("hf").display()
    ))
    .unwrap();
    let r = jemma_node::setup::HubResolver::from_config(&config, &|_| None).unwrap();
    assert_eq!(
        r.drafter_for(&dir.path().join("gemma-4-tiny-it-4bit")),
        Some(dir.path().join("gemma-4-tiny-it-assistant-bf16"))
    );
    // The fixtures directory itself pairs nothing: its drafter is not named after `tiny`.
    assert_eq!(r.drafter_for(&fixture("tiny")), None);
}

#[test]
fn footprint_estimate_is_within_15_percent_of_the_measured_peak() {
    for model in ["tiny", "moe", "tiny-q4", "moe-q4", "small"] {
        for n in [200usize, 1000, 3000] {
            if model == "small" && n == 3000 {
                continue;
            }
            let ids: Vec<String> = (0..n).map(|i| (3 + (i * 7) % 900).to_string()).collect();
            let out = crate::support::output_within(
                Command::new(env!("CARGO_BIN_EXE_jemma"))
                    .args([
                        "generate",
                        "--json",
                        "--ignore-eos",
                        "--max-tokens",
                        "16",
                        "--model",
                    ])
                    .arg(fixture(model))
                    .args(["--prompt-ids", &ids.join(",")]),
                crate::support::CMD_DEADLINE,
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            let f = &v["footprint_estimate"];
            let est = ["weights_bytes", "kv_cache_bytes", "activation_bytes"]
                .iter()
                .map(|k| f[k].as_u64().unwrap())
                .sum::<u64>() as f64;
            let peak = v["peak_memory_bytes"].as_u64().unwrap() as f64;
            let ratio = est / peak;
            eprintln!("{model} n={n}: estimate {est:.0} peak {peak:.0} ratio {ratio:.3}");
            assert!(
                (0.85..=1.15).contains(&ratio),
                "{model} n={n}: ratio {ratio:.3}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_unload_releases_memory_and_the_next_request_reloads() {
    let cfg = format!(
        "[memory]\npressure = \"off\"\n[tiers.fast]\nmodel = \"{}\"\nkeep_alive_secs = 2\ncontext_length = 1024\n",
        fixture("small").display()
    );
    let s = Server::start(&[], Some(&cfg));
    let client = crate::support::client();
    assert_eq!(chat(&client, &s, "fast").await.0, 200);
    let loaded = tier(&health(&s), "fast");
    assert_eq!(loaded["state"], "ready");
    let rss_loaded = loaded["details"]["process_rss_bytes"].as_u64().unwrap();
    let mlx_loaded = loaded["details"]["mlx_active_bytes"].as_u64().unwrap();
    assert!(mlx_loaded > 90 << 20, "weights resident: {mlx_loaded}");
    wait_for("the idle unload", Duration::from_secs(20), || {
        tier(&health(&s), "fast")["state"] == "unloaded"
    });
    let h = health(&s);
    let unloaded = tier(&h, "fast");
    let rss_unloaded = unloaded["details"]["process_rss_bytes"].as_u64().unwrap();
    let mlx_unloaded = unloaded["details"]["mlx_active_bytes"].as_u64().unwrap();
    eprintln!("rss {rss_loaded} -> {rss_unloaded}, mlx {mlx_loaded} -> {mlx_unloaded}");
    assert!(
        mlx_unloaded < 8 << 20,
        "MLX memory released: {mlx_unloaded}"
    );
    assert!(
        rss_loaded.saturating_sub(rss_unloaded) > 60 << 20,
        "RSS dropped by the weights: {rss_loaded} -> {rss_unloaded}"
    );
    assert_eq!(h["memory"]["reserved_bytes"], 0, "{h}");
    // Transparent reload.
    let (code, body) = chat(&client, &s, "fast").await;
    assert_eq!(code, 200, "{body}");
    let back = tier(&health(&s), "fast");
    assert_eq!(back["state"], "ready");
    assert!(back["details"]["process_rss_bytes"].as_u64().unwrap() > rss_unloaded + (60 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_over_the_memory_limit_is_refused_and_requests_fall_back() {
    let (s, h) = crate::support::over_memory_limit(&fixture("small"), 512);
    let primary = tier(&h, "primary");
    let err = primary["last_error"].as_str().unwrap();
    assert!(
        err.contains("insufficient memory") && err.contains("memory limit is 64 MiB"),
        "{err}"
    );
    assert!(
        primary["details"]["footprint"]["weights_bytes"]
            .as_u64()
            .unwrap()
            > 100_000_000
    );
    assert_eq!(tier(&h, "fast")["state"], "ready");
    // The refused tier's requests fall back, and the fallback chain says why.
    let client = crate::support::client();
    let (code, body) = chat(&client, &s, "primary").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["_routing"]["tier"], "fast");
    let chain = body["_routing"]["fallback"].to_string();
    assert!(chain.contains("insufficient memory"), "{chain}");
    // Nothing was loaded for the refused model.
    let mlx = tier(&health(&s), "primary")["details"]["mlx_active_bytes"]
        .as_u64()
        .unwrap();
    assert!(mlx < 64 << 20, "{mlx}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_pressure_unloads_idle_models() {
    let dir = tempfile::tempdir().unwrap();
    let psi = dir.path().join("memory.pressure");
    let calm = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
    std::fs::write(&psi, calm).unwrap();
    let cfg = format!(
        "[memory]\npressure = \"{}\"\npoll_secs = 0.1\n[tiers.fast]\nmodel = \"{}\"\nkeep_alive_secs = -1\n",
        psi.display(),
        fixture("tiny").display()
    );
    let s = Server::start(&[], Some(&cfg));
    let client = crate::support::client();
    assert_eq!(chat(&client, &s, "fast").await.0, 200);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        tier(&health(&s), "fast")["state"],
        "ready",
        "no pressure, no unload"
    );
    std::fs::write(
        &psi,
        "some avg10=55.00 avg60=20.00 avg300=5.00 total=9000\nfull avg10=12.00 avg60=4.00 avg300=1.00 total=3000\n",
    )
    .unwrap();
    wait_for("the pressure unload", Duration::from_secs(10), || {
        tier(&health(&s), "fast")["state"] == "unloaded"
    });
    assert_eq!(health(&s)["memory"]["pressure"], "critical");
    std::fs::write(&psi, calm).unwrap();
    let (code, body) = chat(&client, &s, "fast").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(tier(&health(&s), "fast")["state"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_switches_models_without_a_restart() {
    let cfg = format!(
        "[memory]\npressure = \"off\"\n[tiers.fast]\nmodel = \"{}\"\n[tiers.primary]\nmodel = \"{}\"\n\
         [tiers.heavy]\nmodel = \"{}\"\npreload = false\n",
        fixture("tiny").display(),
        fixture("tiny").display(),
        fixture("moe-q4").display()
    );
    let s = Server::start(&[], Some(&cfg));
    let client = crate::support::client();
    // Tiers naming the same model share one engine, and /health says so: its figures are read once.
    let engine_id = |h: &Value, t: &str| tier(h, t)["details"]["engine_id"].as_u64().unwrap();
    let h = health(&s);
    assert_eq!(engine_id(&h, "fast"), engine_id(&h, "primary"));
    assert_ne!(engine_id(&h, "fast"), engine_id(&h, "heavy"));
    // A lazily loaded tier holds no memory until its first request.
    let lazy = tier(&health(&s), "heavy");
    assert_eq!(lazy["state"], "unloaded");
    assert_eq!(lazy["model_loaded"], false);
    let (code, body) = chat(&client, &s, "heavy").await;
    assert_eq!(
        (code, body["_routing"]["tier"].clone()),
        (200, json!("heavy")),
        "{body}"
    );
    assert_eq!(tier(&health(&s), "heavy")["state"], "ready");
    let post = |body: Value, headers: Vec<(&'static str, &'static str)>| {
        let mut r = client
            .post(format!("{}/admin/tiers/fast/model", s.url))
            .json(&body);
        for (k, v) in headers {
            r = r.header(k, v);
        }
        r.send()
    };
    // Only this machine may change models (a tailnet-proxied caller may not, key or no key).
    let r = post(
        json!({"model": "x"}),
        vec![("tailscale-user-login", "eve@example.com")],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let r = post(
        json!({"model": "no/such-model-anywhere", "wait": true}),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
    let r = post(json!({"nope": 1}), vec![]).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = post(json!({"model": fixture("moe"), "wait": true}), vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let h = health(&s);
    assert_eq!(tier(&h, "fast")["model"], "moe");
    assert_eq!(tier(&h, "fast")["state"], "ready");
    // The other tier shared the old engine and keeps it.
    assert_eq!(tier(&h, "primary")["model"], "tiny");
    assert_ne!(engine_id(&h, "fast"), engine_id(&h, "primary"));
    let (code, body) = chat(&client, &s, "fast").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["_routing"]["model"], "moe");
    // Asynchronous form: 202 at once, /health shows the swap, then the new model serves.
    let r = post(json!({"model": fixture("tiny-q4")}), vec![])
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_for("the asynchronous swap", Duration::from_secs(30), || {
        tier(&health(&s), "fast")["model"] == "tiny-q4"
    });
    assert_eq!(chat(&client, &s, "fast").await.0, 200);
}
