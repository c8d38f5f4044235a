//! The `jemma` CLI as scripts use it: `generate --json` and `--logits-out` against the mlx-lm reference,
//! `doctor --json`.

use std::process::Command;

use serde_json::Value;

use crate::support::fixture;

fn jemma(args: &[&str]) -> (bool, String, String) {
    let out = crate::support::output_within(
        Command::new(env!("CARGO_BIN_EXE_jemma"))
            .args(args)
            .env("JEMMA_LOG", "warn"),
        crate::support::CMD_DEADLINE,
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn generate_json_and_logits_out_match_the_reference() {
    let dir = fixture("tiny");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let p = &meta["prompts"]["long"];
    let ids: Vec<String> = p["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect();
    let want: Vec<u64> = p["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let logits = tmp.path().join("logits.safetensors");
    let (ok, stdout, stderr) = jemma(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &ids.join(","),
        "--max-tokens",
        &want.len().to_string(),
        "--ignore-eos",
        "--dtype",
        "checkpoint",
        "--logits-out",
        logits.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    let got: Vec<u64> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(got, want);
    for k in ["text", "prefill_tps", "decode_tps", "peak_memory_bytes"] {
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
    assert!(v["decode_tps"].as_f64().unwrap() > 0.0);
    // --logits-out: float32 tensor `logits`, equal to mlx-lm's (compared in Python-free form: raw bytes)
    let bytes = std::fs::read(&logits).unwrap();
    let reference = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let ours = tensor_f32(&bytes, "logits");
    let theirs = tensor_f32(&reference, "long.logits");
    assert_eq!(ours.len(), theirs.len());
    let max = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max <= 1e-4, "max |Δlogit| {max}");
}

/// Reads one float32 tensor from a safetensors file (8-byte header length, JSON header, data).
fn tensor_f32(buf: &[u8], name: &str) -> Vec<f32> {
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&buf[8..8 + n]).unwrap();
    let t = &header[name];
    assert_eq!(t["dtype"], "F32", "{name}: {t}");
    let off = t["data_offsets"].as_array().unwrap();
    let (a, b) = (
        off[0].as_u64().unwrap() as usize,
        off[1].as_u64().unwrap() as usize,
    );
    buf[8 + n + a..8 + n + b]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn doctor_reports_the_cpu_device_and_float32() {
    let (ok, stdout, stderr) = jemma(&["doctor", "--json"]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["mlx"]["device"], "cpu");
    assert_eq!(v["mlx"]["compute_dtype"], "float32");
    assert!(v["hardware"]["total_memory_bytes"].as_u64().unwrap() > 0);
    assert!(v["hardware"]["disk_free_bytes"].as_u64().unwrap() > 0);
    // A verdict per catalog model, and a configuration this build can serve.
    let fits = v["recommendation"]["fits"].as_array().unwrap();
    let heavy = fits
        .iter()
        .find(|f| f["model"] == "gemma-4-26b-a4b")
        .unwrap();
    assert_eq!(heavy["fits"], false);
    assert!(heavy["reason"].as_str().unwrap().contains("Cloud Run"));
    let toml = v["recommendation"]["config_toml"].as_str().unwrap();
    jemma_router::config::Config::parse(toml).expect("the recommended config parses");
    assert!(toml.contains("[tiers.fast]"), "{toml}");
}

#[test]
fn doctor_estimates_a_models_footprint() {
    let (ok, stdout, stderr) = jemma(&[
        "doctor",
        "--json",
        "--model",
        crate::support::fixture("tiny").to_str().unwrap(),
        "--context",
        "2048",
    ]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let f = &v["footprint"];
    assert_eq!(f["context_length"], 2048);
    assert_eq!(
        f["weights_bytes"], 5_440_728,
        "tensor bytes of the tiny fixture"
    );
    assert!(f["kv_cache_bytes"].as_u64().unwrap() > 0);
    assert_eq!(f["sequences"], 4, "a tier's default batch, one cache each");
}

#[test]
fn bad_model_directory_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let (ok, _, stderr) = jemma(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("llama") && stderr.contains("Gemma 4"),
        "{stderr}"
    );
}

#[test]
fn keys_are_created_listed_revoked_and_required_for_an_exposed_bind() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("keys.json");
    let f = file.to_str().unwrap();
    let tiny = fixture("tiny");
    // No key yet: binding all interfaces is refused with a clear message.
    let out = crate::support::output_within(
        Command::new(env!("CARGO_BIN_EXE_jemma"))
            .args([
                "serve",
                "--model",
                tiny.to_str().unwrap(),
                "--host",
                "0.0.0.0",
                "--port",
                "0",
            ])
            .env("JEMMA_KEYS_FILE", f)
            .env("JEMMA_LOG", "warn"),
        crate::support::CMD_DEADLINE,
    );
    let (ok, stderr) = (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(!ok);
    assert!(stderr.contains("jemma keys create"), "{stderr}");
    let (ok, key, _) = jemma(&["keys", "--file", f, "create", "--name", "laptop"]);
    assert!(ok);
    let key = key.trim().to_string();
    assert!(key.starts_with("jm-") && key.len() > 40, "{key}");
    assert!(
        !std::fs::read_to_string(&file).unwrap().contains(&key),
        "only the hash is stored"
    );
    let (ok, list, _) = jemma(&["keys", "--file", f, "list"]);
    assert!(
        ok && list.contains("laptop") && !list.contains(&key),
        "{list}"
    );
    let (ok, _, _) = jemma(&["keys", "--file", f, "revoke", "laptop"]);
    assert!(ok);
    let (ok, _, stderr) = jemma(&["keys", "--file", f, "revoke", "laptop"]);
    assert!(!ok && stderr.contains("no key"), "{stderr}");
}

/// A non-loopback address of this machine, if it has one.
fn lan_ip() -> Option<std::net::IpAddr> {
    // Connecting a UDP socket sends nothing; it only picks the interface the route would use.
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("10.254.254.254:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn callers_from_the_network_need_a_key_loopback_callers_do_not() {
    let Some(ip) = lan_ip() else {
        eprintln!("no non-loopback interface on this machine: nothing to test");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("keys.json");
    let (ok, key, _) = jemma(&[
        "keys",
        "--file",
        f.to_str().unwrap(),
        "create",
        "--name",
        "lan",
    ]);
    assert!(ok);
    let key = key.trim().to_string();
    let s = crate::support::Server::start_with(
        &[
            "--model",
            fixture("tiny").to_str().unwrap(),
            "--host",
            "0.0.0.0",
        ],
        None,
        &[("JEMMA_KEYS_FILE", f.to_str().unwrap())],
        None,
    );
    let port = s.url.rsplit(':').next().unwrap().to_string();
    let local = crate::support::ureq_get(&format!("http://127.0.0.1:{port}/v1/models")).unwrap();
    assert_eq!(local.0, 200, "loopback callers are exempt");
    let lan = crate::support::ureq_get(&format!("http://{ip}:{port}/v1/models")).unwrap();
    assert_eq!(lan.0, 401, "a caller on {ip} must present a key: {}", lan.1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let code = rt.block_on(async {
        crate::support::client()
            .get(format!("http://{ip}:{port}/v1/models"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    assert_eq!(code, 200);
}

/// Each engine's KV settings on the command line: `--cache-type-k/-v` reach llama.cpp (`jemma bench` and
/// `jemma generate` on a GGUF report the types, and a Q8_0 cache answers the same ids as `generate`'s
/// warm-up in `bench`); MLX's `--kv-bits` and `--dtype` on a GGUF, the cache types on an MLX model, and
/// a type llama.cpp does not have are refused, naming the flag, rather than ignored.
#[test]
fn kv_cache_flags_reach_their_engine_or_are_refused() {
    let gguf = fixture("tiny")
        .parent()
        .unwrap()
        .join("gguf/tiny-q8_0.gguf");
    let g = gguf.to_str().unwrap();
    let ids = "2,105,300,301,302,303,304,305,306,307";
    let q8 = ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"];
    let mut args = vec![
        "bench",
        "--model",
        g,
        "--prompt-ids",
        ids,
        "--gen",
        "4",
        "--runs",
        "1",
    ];
    args.extend(q8);
    args.push("--json");
    let (ok, stdout, stderr) = jemma(&args);
    assert!(ok, "{stderr}");
    let b: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        [&b["cache_type_k"], &b["cache_type_v"]],
        ["q8_0", "q8_0"],
        "{b}"
    );
    let mut args = vec![
        "generate",
        "--model",
        g,
        "--prompt-ids",
        ids,
        "--max-tokens",
        "4",
    ];
    args.extend(["--ignore-eos", "--json"]);
    args.extend(q8);
    let (ok, stdout, stderr) = jemma(&args);
    assert!(ok, "{stderr}");
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["cache_type_v"], "q8_0", "{r}");
    assert_eq!(
        r["tokens"], b["tokens"],
        "one engine, one cache, one answer"
    );
    let tiny = fixture("tiny");
    let t = tiny.to_str().unwrap();
    for (args, flag) in [
        (
            vec![
                "generate",
                "--model",
                g,
                "--prompt-ids",
                ids,
                "--kv-bits",
                "8",
            ],
            "--kv-bits",
        ),
        (
            vec![
                "generate",
                "--model",
                g,
                "--prompt-ids",
                ids,
                "--dtype",
                "float16",
            ],
            "--dtype",
        ),
        (vec!["bench", "--model", g, "--dtype", "float16"], "--dtype"),
        (
            vec![
                "generate",
                "--model",
                t,
                "--prompt-ids",
                ids,
                "--cache-type-k",
                "q8_0",
            ],
            "--cache-type-k",
        ),
        (
            vec!["bench", "--model", t, "--cache-type-v", "q8_0"],
            "--cache-type-v",
        ),
        (
            vec![
                "generate",
                "--model",
                g,
                "--prompt-ids",
                ids,
                "--cache-type-k",
                "q4_k",
            ],
            "q4_k",
        ),
    ] {
        let (ok, _, stderr) = jemma(&args);
        assert!(!ok && stderr.contains(flag), "{args:?}: {stderr}");
    }
}

/// `jemma bench` on a GGUF times the llama.cpp engine as `jemma serve` runs it: its warm-up answers as
/// `jemma generate` does on the same ids, and each timed run reads its prompt (a rotation of the ids, not
/// found in a slot), so the prefill rate is a real one. Without ids it reads the GGUF's BOS and random ids;
/// with too few to rotate, it says what it needs.
#[test]
fn bench_on_a_gguf_times_the_llama_engine() {
    let model = fixture("tiny").parent().unwrap().join("gguf/tiny-f32.gguf");
    let m = model.to_str().unwrap();
    let ids = "2,105,300,301,302,303,304,305,306,307";
    let (ok, stdout, stderr) = jemma(&[
        "bench",
        "--model",
        m,
        "--prompt-ids",
        ids,
        "--gen",
        "6",
        "--runs",
        "2",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let b: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(b["engine"], "llama.cpp");
    assert_eq!(b["runs"], 2);
    assert_eq!(b["prompt_tokens"], 10);
    assert!(b["prefill_tps"].as_f64().unwrap() > 0.0, "{b}");
    assert!(b["decode_tps"].as_f64().unwrap() > 0.0, "{b}");
    assert!(b["max_cached_tokens"].as_u64().unwrap() <= 1, "{b}");
    let (ok, stdout, stderr) = jemma(&[
        "generate",
        "--model",
        m,
        "--prompt-ids",
        ids,
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let g: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(b["tokens"], g["tokens"], "the warm-up's tokens");
    assert_eq!(b["tokens"].as_array().unwrap().len(), 6);
    // Without ids: the GGUF's BOS and random ids from its vocabulary, --prompt-tokens of them.
    let (ok, stdout, stderr) = jemma(&[
        "bench",
        "--model",
        m,
        "--prompt-tokens",
        "12",
        "--gen",
        "2",
        "--runs",
        "1",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["prompt_tokens"], 12, "{r}");
    assert!(r["max_cached_tokens"].as_u64().unwrap() <= 1, "{r}");
    // Three ids rotate two ways only: a third timed run would read the warm-up's prompt again.
    let (ok, _, stderr) = jemma(&[
        "bench",
        "--model",
        m,
        "--prompt-ids",
        "2,105,300",
        "--runs",
        "2",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--runs 2 needs at least 4 prompt tokens"),
        "{stderr}"
    );
}
