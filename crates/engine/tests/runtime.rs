//! The engine host: idle keep-alive unloads the weights (MLX memory released) and the next request reloads
//! them transparently; a dropped receiver cancels the request.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use jemma_engine::generate::GenerateOptions;
use jemma_engine::runtime::{Engine, EngineConfig, EngineState, Event, Prompt, Request};

/// One test at a time: MLX's memory figures are the process's, so one test's engine would show in another's
/// unload check.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn tiny() -> PathBuf {
    let root = std::env::var("JEMMA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"));
    root.join("tiny")
}

fn request(max_tokens: usize) -> Request {
    Request {
        prompt: Prompt::Ids(vec![2, 105, 300, 301]),
        options: GenerateOptions {
            max_tokens,
            ..Default::default()
        },
        stop: vec![],
        parse_output: false,
        json_mode: false,
    }
}

fn run(engine: &Engine, max_tokens: usize) -> usize {
    let mut rx = engine.submit(request(max_tokens)).unwrap();
    let mut done = 0;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Done(s) => done = s.stats.completion_tokens,
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    done
}

fn wait_for(engine: &Engine, what: &str, f: impl Fn(&EngineState) -> bool) {
    let t0 = Instant::now();
    while !f(&engine.status().state) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}: {:?}",
            engine.status().state
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idle_keep_alive_unloads_and_the_next_request_reloads() {
    let _serial = serial();
    let mut cfg = EngineConfig::new(tiny());
    cfg.keep_alive = Some(Duration::from_millis(300));
    let engine = Engine::start(cfg).unwrap();
    engine.wait_ready().unwrap();
    assert_eq!(run(&engine, 4), 4);
    let loaded_bytes = engine.status().info.memory.active_bytes;
    assert!(
        loaded_bytes > 1_000_000,
        "weights are in MLX memory: {loaded_bytes}"
    );
    wait_for(&engine, "unload", |s| *s == EngineState::Unloaded);
    let unloaded = engine.status().info.memory.active_bytes;
    assert!(
        unloaded < loaded_bytes / 10,
        "MLX memory released: {loaded_bytes} → {unloaded}"
    );
    // Transparent reload.
    assert_eq!(run(&engine, 3), 3);
    assert_eq!(engine.status().state, EngineState::Ready);
    assert_eq!(engine.status().requests, 2);
    // Free the model before the test process exits.
    assert!(engine.shutdown(Duration::from_secs(20)));
}

#[test]
fn dropping_the_receiver_cancels_generation() {
    let _serial = serial();
    let engine = Engine::start(EngineConfig::new(tiny())).unwrap();
    engine.wait_ready().unwrap();
    let mut rx = engine.submit(request(100_000)).unwrap();
    // Read the first token, then hang up.
    while let Some(ev) = rx.blocking_recv() {
        if matches!(ev, Event::Logprobs(_) | Event::Content(_)) {
            break;
        }
    }
    drop(rx);
    // The engine is free again quickly (a 100k-token generation would take minutes).
    let t0 = Instant::now();
    assert_eq!(run(&engine, 2), 2);
    assert!(t0.elapsed() < Duration::from_secs(10));
    // Free the model before the test process exits.
    assert!(engine.shutdown(Duration::from_secs(20)));
}

/// A stop string that completes on the last token `max_tokens` allows ends the request as `stop` (its text
/// held back), not `length`; one that completes earlier cuts the answer there.
#[test]
fn a_stop_string_on_the_last_allowed_token_is_a_stop() {
    let _serial = serial();
    use jemma_engine::generate::FinishReason;
    let engine = Engine::start(EngineConfig::new(tiny())).unwrap();
    engine.wait_ready().unwrap();
    let answer = |max_tokens: usize, stop: Vec<String>| {
        let mut r = request(max_tokens);
        r.stop = stop;
        let mut rx = engine.submit(r).unwrap();
        let mut text = String::new();
        loop {
            match rx.blocking_recv().unwrap() {
                Event::Content(c) => text.push_str(&c),
                Event::Done(s) => return (text, s.stats.finish_reason, s.stats.completion_tokens),
                Event::Error(e) => panic!("{e}"),
                _ => {}
            }
        }
    };
    let texts: Vec<String> = (0..=12).map(|k| answer(k, vec![]).0).collect();
    assert_eq!(answer(12, vec![]).1, FinishReason::Length);
    // A token whose text is new: as a stop string it completes exactly on that token.
    let n = (2..=12)
        .find(|&n| {
            let tail = &texts[n][texts[n - 1].len().min(texts[n].len())..];
            texts[n].starts_with(&texts[n - 1])
                && tail.trim().len() > 1
                && !texts[n - 1].contains(tail)
        })
        .expect("some token's text is new");
    let tail = texts[n][texts[n - 1].len()..].to_string();
    let (text, finish, generated) = answer(n, vec![tail.clone()]);
    assert_eq!(finish, FinishReason::Stop, "{tail:?} in {text:?}");
    assert_eq!((text, generated), (texts[n - 1].clone(), n));
    // Free the model before the test process exits.
    assert!(engine.shutdown(Duration::from_secs(20)));
}

/// The MLX prefix cache: a request whose prompt continues exactly what the previous one left in the cache
/// (the next turn of a conversation: the old prompt, the answer's tokens, something new) prefills only the
/// new part and answers as a cold engine does — the same greedy tokens, every token's top-5 logprobs within
/// 1e-4 — at prompt lengths on both sides of the sliding window (16) and of the prefill chunk (8).
#[test]
fn a_continued_conversation_reuses_the_cache_and_answers_as_cold() {
    let _serial = serial();
    let warm = Engine::start(EngineConfig::new(tiny())).unwrap();
    warm.wait_ready().unwrap();
    let cold = Engine::start(EngineConfig::new(tiny())).unwrap();
    cold.wait_ready().unwrap();
    // (generated ids, each token's top-5 logprobs, cached prompt tokens)
    let answer = |engine: &Engine, ids: &[u32], max_tokens: usize| {
        let mut r = request(max_tokens);
        r.prompt = Prompt::Ids(ids.to_vec());
        r.options.prefill_step = 8;
        r.options.logprobs = true;
        r.options.top_logprobs = 5;
        let mut rx = engine.submit(r).unwrap();
        let mut lps: Vec<Vec<f64>> = vec![];
        loop {
            match rx.blocking_recv().unwrap() {
                Event::Logprobs(t) => {
                    let v = serde_json::to_value(&t).unwrap();
                    lps.push(
                        v["top_logprobs"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x["logprob"].as_f64().unwrap())
                            .collect(),
                    );
                }
                Event::Done(s) => return (s.tokens, lps, s.cached_tokens),
                Event::Error(e) => panic!("{e}"),
                _ => {}
            }
        }
    };
    for len in [5usize, 17, 33, 70] {
        let a: Vec<u32> = std::iter::once(2)
            .chain((1..len as u32).map(|k| 300 + (k * 37) % 400))
            .collect();
        // Turn 1; turn 2 = turn 1's prompt + its answer + 11 new tokens.
        let (t1, _, _) = answer(&warm, &a, 4);
        assert_eq!(t1.len(), 4);
        let mut b = a.clone();
        b.extend(&t1);
        b.extend((0..11).map(|k| 500 + k));
        let (warm_t, warm_lp, reused) = answer(&warm, &b, 3);
        // What the cache held: the prompt and the answer's tokens that were fed back (all but the last).
        assert_eq!(reused, a.len() + 3, "len {len}");
        let (cold_t, cold_lp, none) = answer(&cold, &b, 3);
        assert_eq!(
            none, 0,
            "len {len}: the cold engine's cache holds something unrelated"
        );
        assert_eq!(warm_t, cold_t, "len {len}: tokens");
        let d = warm_lp
            .iter()
            .flatten()
            .zip(cold_lp.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0f64, f64::max);
        assert!(d <= 1e-4, "len {len}: warm vs cold logprobs differ by {d}");
        eprintln!(
            "len {len}: reused {reused} of {}, max |Δlogprob| {d:e}",
            b.len()
        );
        // Leave the cold engine's cache unrelated to the next prompt.
        answer(&cold, &[7, 8, 9], 1);
    }
    // Free the models before the test process exits.
    assert!(warm.shutdown(Duration::from_secs(20)));
    assert!(cold.shutdown(Duration::from_secs(20)));
}
