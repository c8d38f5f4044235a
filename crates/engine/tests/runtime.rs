//! The engine host: idle keep-alive unloads the weights (MLX memory released) and the next request reloads
//! them transparently; a dropped receiver cancels the request.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use jemma_engine::generate::GenerateOptions;
use jemma_engine::runtime::{Engine, EngineConfig, EngineState, Event, Prompt, Request};

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
}

#[test]
fn dropping_the_receiver_cancels_generation() {
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
}
