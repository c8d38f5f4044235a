//! The engine host: idle keep-alive unloads the weights (MLX memory released) and the next request reloads
//! them transparently; a dropped receiver cancels the request.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jemma_engine::generate::GenerateOptions;
use jemma_engine::runtime::{
    Engine, EngineConfig, EngineState, EngineStatus, Event, Prompt, Request,
};

/// One test at a time: MLX's memory figures are the process's, so one test's engine would show in another's
/// unload check.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn tiny() -> PathBuf {
    jemma_fixtures::fixture("tiny", "config.json")
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
        constraint: None,
        thinking_token_budget: None,
        parallel_tool_calls: true,
        fit_context: false,
        images: vec![],
        audio: vec![],
        videos: vec![],
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

fn wait_for(engine: &Engine, what: &str, f: impl Fn(&EngineStatus) -> bool) {
    assert!(
        engine.wait_until(Duration::from_secs(20), f),
        "timed out waiting for {what}: {:?}",
        engine.status().state
    );
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
    wait_for(&engine, "unload", |s| s.state == EngineState::Unloaded);
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

/// A tool call is sent whole once it closes; every step that writes a token of it before that sends
/// `Progress`, so that the router's idle deadline sees a model writing a long call as working, not stalled.
#[test]
fn each_token_of_a_call_being_written_is_progress() {
    let _serial = serial();
    let engine = Engine::start(EngineConfig::new(tiny())).unwrap();
    engine.wait_ready().unwrap();
    let mut r = request(64);
    r.parse_output = true;
    r.parallel_tool_calls = false;
    r.constraint = Some(jemma_constrain::Constraint::ToolCalls {
        tools: vec![jemma_constrain::ToolSpec {
            name: "get_weather".into(),
            parameters: serde_json::json!({"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 6}}, "required": ["city"]}),
        }],
        parallel: false,
    });
    let mut rx = engine.submit(r).unwrap();
    let (mut progress, mut calls, mut other) = (0, 0, 0);
    let s = loop {
        match rx.blocking_recv().unwrap() {
            Event::Progress => progress += 1,
            Event::ToolCall(c) => {
                assert_eq!(c.name, "get_weather");
                calls += 1;
            }
            Event::Started { .. } => {}
            Event::Done(s) => break s,
            Event::Error(e) => panic!("{e}"),
            _ => other += 1,
        }
    };
    assert_eq!((calls, other), (1, 0), "{s:?}");
    assert!(s.tool_calls);
    // Every token was held but the first (its step sent Started) and the one that closed the call; the
    // one-chunk prompt was read in the first token's step.
    assert_eq!(progress + 2, s.stats.completion_tokens, "{s:?}");
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
    let (warm, cold) = warm_and_cold();
    let answer = |engine: &Engine, ids: &[u32], max_tokens: usize| {
        answer_with(engine, Prompt::Ids(ids.to_vec()), max_tokens)
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
        let d = max_diff(&warm_lp, &cold_lp);
        assert!(d <= 1e-4, "len {len}: warm vs cold logprobs differ by {d}");
        eprintln!(
            "len {len}: reused {reused} of {}, max |Δlogprob| {d:e}",
            b.len()
        );
    }
    // Free the models before the test process exits.
    assert!(warm.shutdown(Duration::from_secs(20)));
    assert!(cold.shutdown(Duration::from_secs(20)));
}

/// Trimming (mlx_lm.server's "longer" entries): a repeated prompt, a regenerated answer or an edited last
/// message shares a prefix with an entry that runs on past it; the engine copies that entry, drops the
/// positions past the common part and answers as a cold engine does, while the entry stays for the
/// conversation it came from. Sliding-window caches can be cut back only until their window (16) has
/// filled: past that, to a rollback point the prefill took (llama-server's sliding-window checkpoints).
#[test]
fn a_repeated_or_edited_prompt_reuses_a_trimmed_copy_and_answers_as_cold() {
    let _serial = serial();
    let (warm, cold) = warm_and_cold();
    let check = |ids: &[u32], expect_reused: usize, what: &str| {
        let (wt, wl, reused) = answer_with(&warm, Prompt::Ids(ids.to_vec()), 4);
        assert_eq!(reused, expect_reused, "{what}: cached tokens");
        let (ct, cl, none) = answer_with(&cold, Prompt::Ids(ids.to_vec()), 4);
        assert_eq!(none, 0);
        assert_eq!(wt, ct, "{what}: tokens");
        let d = max_diff(&wl, &cl);
        assert!(d <= 1e-4, "{what}: warm vs cold logprobs differ by {d}");
        eprintln!("{what}: reused {reused}, max |Δlogprob| {d:e}");
        wt
    };
    for len in [5usize, 9, 12] {
        // A first token of its own: nothing cached yet shares a prefix with it.
        let a: Vec<u32> = std::iter::once(100 + len as u32)
            .chain((1..len as u32).map(|k| 300 + (k * 41) % 400))
            .collect();
        let first = check(&a, 0, &format!("len {len}, first"));
        // The entry holds a + 3 answer tokens: at most 15 positions, inside the window.
        check(&a, len - 1, &format!("len {len}, repeated"));
        let mut edited = a[..len - 2].to_vec();
        edited.extend([600, 601, 602]);
        check(&edited, len - 2, &format!("len {len}, edited"));
        // The original conversation's entry is still whole.
        let mut next = a.clone();
        next.extend(&first);
        next.extend([700, 701]);
        check(&next, len + 3, &format!("len {len}, continued"));
    }
    // A window that has filled cannot be cut back, but it returns to a rollback point: one is taken at
    // each prefill chunk end (every 8 tokens here) once the window (16) has filled, and kept with the
    // entry. 17 prompt tokens: a point at 16, all but the last token.
    let long: Vec<u32> = std::iter::once(150)
        .chain((1..17u32).map(|k| 300 + (k * 43) % 400))
        .collect();
    check(&long, 0, "len 17, first");
    check(&long, 16, "len 17, repeated");
    // 29 tokens: points at 16, 24 and 28. Repeated, the one at 28 serves; edited after its 26th token,
    // the one at 24; after its 20th, the one at 16 (each request passes the points at or before what it
    // reused on to its own entry).
    let long: Vec<u32> = std::iter::once(151)
        .chain((1..29u32).map(|k| 300 + (k * 47) % 400))
        .collect();
    check(&long, 0, "len 29, first");
    check(&long, 28, "len 29, repeated");
    for (cut, reused) in [(26, 24), (20, 16)] {
        let mut edited = long[..cut].to_vec();
        edited.extend([600, 601, 602]);
        check(&edited, reused, &format!("len 29, edited after {cut}"));
    }
    assert!(warm.shutdown(Duration::from_secs(20)));
    assert!(cold.shutdown(Duration::from_secs(20)));
}

/// Continuous batching on the MLX engine: requests decoded together answer as each does alone. Four
/// requests of different lengths (on both sides of the sliding window of 16) and options (a repetition
/// penalty, a seeded sample, JSON mode, which decodes unbatched) run at once on an engine of 4 sequences
/// and one at a time on an engine of 1; on every fixture model (dense, MoE, each in f32 and 4-bit) the
/// tokens are the same and every token's top-5 logprobs agree to 1e-4.
#[test]
fn batched_answers_equal_lone_answers_on_every_fixture() {
    let _serial = serial();
    let root = tiny().parent().unwrap().to_path_buf();
    for name in ["tiny", "tiny-q4", "moe", "moe-q4"] {
        let dir = root.join(name);
        let mut config = EngineConfig::new(&dir);
        config.max_sequences = 4;
        let batched = Engine::start(config).unwrap();
        batched.wait_ready().unwrap();
        let mut config = EngineConfig::new(&dir);
        config.max_sequences = 1;
        let lone = Engine::start(config).unwrap();
        lone.wait_ready().unwrap();
        let requests: Vec<Request> = (0..4u32)
            .map(|i| {
                let len = [5u32, 12, 23, 40][i as usize];
                let mut r = request(20 + 3 * i as usize);
                r.prompt = Prompt::Ids(
                    std::iter::once(2)
                        .chain((1..len).map(|k| 300 + (k * 31 + i * 7) % 500))
                        .collect(),
                );
                r.options.logprobs = true;
                r.options.top_logprobs = 5;
                match i {
                    1 => r.options.sampling.repetition_penalty = Some(1.3),
                    2 => {
                        r.options.sampling.temperature = 0.8;
                        r.options.sampling.seed = Some(7);
                    }
                    3 => r.constraint = Some(jemma_constrain::Constraint::JsonObject),
                    _ => {}
                }
                r
            })
            .collect();
        // (tokens, top-5 logprobs of each token)
        type Answer = (Vec<u32>, Vec<Vec<f64>>);
        let collect = |rx: &mut tokio::sync::mpsc::Receiver<Event>| -> Answer {
            let mut lps = vec![];
            loop {
                match rx.blocking_recv().expect("the engine ended the stream") {
                    Event::Logprobs(t) => {
                        let v = serde_json::to_value(&t).unwrap();
                        lps.push(
                            v["top_logprobs"]
                                .as_array()
                                .unwrap()
                                .iter()
                                // JSON mode's mask leaves some alternatives at -inf (null).
                                .map(|x| x["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY))
                                .collect(),
                        );
                    }
                    Event::Done(s) => return (s.tokens, lps),
                    Event::Error(e) => panic!("{name}: {e}"),
                    _ => {}
                }
            }
        };
        let alone: Vec<Answer> = requests
            .iter()
            .map(|r| collect(&mut lone.submit(r.clone()).unwrap()))
            .collect();
        let mut rxs: Vec<_> = requests
            .iter()
            .map(|r| batched.submit(r.clone()).unwrap())
            .collect();
        let mut most_running = 0;
        let together: Vec<Answer> = rxs
            .iter_mut()
            .map(|rx| {
                most_running = most_running.max(batched.status().running);
                collect(rx)
            })
            .collect();
        assert!(most_running >= 2, "{name}: the requests never ran together");
        let largest = batched.status().info.largest_decode_batch;
        // All four, the constrained one included: its forward pass joins the batch and only its
        // sampling waits for its mask.
        assert_eq!(
            largest, 4,
            "{name}: not every request joined the batched forward"
        );
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a.0, t.0, "{name}: request {i}: tokens");
            let d =
                a.1.iter()
                    .flatten()
                    .zip(t.1.iter().flatten())
                    .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
                    .fold(0f64, f64::max);
            assert!(d <= 1e-4, "{name}: request {i}: logprobs differ by {d}");
            eprintln!(
                "{name}: request {i}: {} tokens, max |Δlogprob| {d:e}",
                t.0.len()
            );
        }
        assert!(batched.shutdown(Duration::from_secs(20)));
        assert!(lone.shutdown(Duration::from_secs(20)));
    }
}

/// Penalties look back over the prompt's tail as well as the answer (mlx-lm's processors; the llama.cpp
/// engine's `penalties_see_the_prompts_tail_from_the_first_token` holds it to the same rule): the tiny
/// model's greedy answer soon repeats itself; cut where its next token already appears in the last 20
/// tokens, that prefix as a prompt answers the repeat plainly and something else under a repetition
/// penalty from the first token on.
#[test]
fn penalties_see_the_prompts_tail_from_the_first_token() {
    let _serial = serial();
    let mut config = EngineConfig::new(tiny());
    config.prefix_cache_bytes = Some(0);
    let e = Engine::start(config).unwrap();
    e.wait_ready().unwrap();
    let base: Vec<u32> = std::iter::once(2)
        .chain((1..30u32).map(|k| 300 + (k * 37) % 400))
        .collect();
    let (plain, _, _) = answer_with(&e, Prompt::Ids(base.clone()), 48);
    let window = jemma_engine::sample::SamplingParams::default().penalty_context;
    let (prompt, repeat) = jemma_fixtures::checks::repeat_prompt(&base, &plain, window);
    let (again, _, _) = answer_with(&e, Prompt::Ids(prompt.clone()), 1);
    assert_eq!(again, [repeat], "the plain answer goes on as before");
    let mut r = request(1);
    r.prompt = Prompt::Ids(prompt);
    r.options.sampling.repetition_penalty = Some(100.0);
    let (penalised, _, _) = answer_of(e.submit(r).unwrap());
    assert_ne!(
        penalised,
        [repeat],
        "the penalty saw the prompt's last {window} tokens"
    );
}

/// Two engines on the tiny model: one with the prefix cache, and one without room for it (every prompt
/// read in full: the cold reference).
fn warm_and_cold() -> (Engine, Engine) {
    let warm = Engine::start(EngineConfig::new(tiny())).unwrap();
    warm.wait_ready().unwrap();
    let mut config = EngineConfig::new(tiny());
    config.prefix_cache_bytes = Some(0);
    let cold = Engine::start(config).unwrap();
    cold.wait_ready().unwrap();
    (warm, cold)
}

/// Greedy tokens, each token's top-5 logprobs and the cached prompt tokens of one request.
fn answer_with(
    engine: &Engine,
    prompt: Prompt,
    max_tokens: usize,
) -> (Vec<u32>, Vec<Vec<f64>>, usize) {
    answer_of(submit_for_answer(engine, prompt, max_tokens))
}

/// Submits the request [`answer_with`] sends.
fn submit_for_answer(
    engine: &Engine,
    prompt: Prompt,
    max_tokens: usize,
) -> tokio::sync::mpsc::Receiver<Event> {
    let mut r = request(max_tokens);
    r.prompt = prompt;
    r.options.prefill_step = 8;
    r.options.logprobs = true;
    r.options.top_logprobs = 5;
    engine.submit(r).unwrap()
}

/// A request's tokens, each token's logprobs (its own, then the top ones') and its cached prompt tokens.
type Answer = (Vec<u32>, Vec<Vec<f64>>, usize);

/// What [`answer_with`] returns, read off a submitted request's events.
fn answer_of(mut rx: tokio::sync::mpsc::Receiver<Event>) -> Answer {
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
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f64, f64::max)
}

fn chat(system: &str, user: &str) -> Prompt {
    Prompt::Chat {
        messages: vec![
            serde_json::json!({"role": "system", "content": system}),
            serde_json::json!({"role": "user", "content": user}),
        ],
        tools: None,
        enable_thinking: None,
    }
}

/// The shared system prompt: a chat's system prompt is checkpointed where it ends (a prefill chunk ends
/// there), and a new conversation with the same system prompt and another question starts from that copy —
/// reading only its own turn — and answers as a cold engine does, at system prompts shorter and longer than
/// the sliding window (16) and the prefill chunk (8), odd lengths included. The copy stays for the next
/// conversation, while the first conversation's own cache is untouched by it.
#[test]
fn a_new_conversation_starts_from_the_shared_system_prompt_and_answers_as_cold() {
    let _serial = serial();
    let (warm, cold) = warm_and_cold();
    for words in [1usize, 3, 9, 23] {
        let system: String = (0..words)
            .map(|i| ["river", "stone", "lantern", "copper", "falcon"][i % 5])
            .collect::<Vec<_>>()
            .join(" ");
        // A longer system prompt begins with a shorter one's words: past the window, a rollback point of
        // an earlier conversation may serve that part, and the answer is still a cold engine's.
        let (ft, fl, first) = answer_with(&warm, chat(&system, "What is first?"), 3);
        if words == 1 {
            assert_eq!(first, 0, "{words} words: nothing cached yet");
        }
        let (ct, cl, _) = answer_with(&cold, chat(&system, "What is first?"), 3);
        assert_eq!(ft, ct, "{words} words, first: tokens");
        assert!(max_diff(&fl, &cl) <= 1e-4, "{words} words, first: logprobs");
        eprintln!("{words} words, first: reused {first}");
        for question in ["Which is last?", "Name one more, please."] {
            let (wt, wl, reused) = answer_with(&warm, chat(&system, question), 4);
            assert!(
                reused > 0,
                "{words} words: the system prompt was not reused"
            );
            let (ct, cl, none) = answer_with(&cold, chat(&system, question), 4);
            assert_eq!(none, 0);
            assert_eq!(wt, ct, "{words} words, {question}: tokens");
            let d = max_diff(&wl, &cl);
            assert!(
                d <= 1e-4,
                "{words} words: warm vs cold logprobs differ by {d}"
            );
            eprintln!("{words} words: reused {reused}, max |Δlogprob| {d:e}");
        }
    }
    let s = warm.status();
    assert!(s.info.prefix_cache_entries > 0 && s.info.prefix_cache_bytes > 0);
    assert!(warm.shutdown(Duration::from_secs(20)));
    assert!(cold.shutdown(Duration::from_secs(20)));
}

/// With thinking on, the end of a conversation's last user turn is checkpointed (mlx_lm.server's "user"
/// segment): once the sliding window (16) has filled, a finished turn's cache can no longer be cut back,
/// yet the next turn whose history renders the answer otherwise than it was generated (Gemma 4's template
/// drops a turn's thinking) and a regenerated answer both start from the checkpoint, and answer as a cold
/// engine does.
#[test]
fn the_next_turn_and_a_regenerated_answer_start_from_the_end_of_the_user_turn() {
    let _serial = serial();
    let (warm, cold) = warm_and_cold();
    let user = |text: &str| serde_json::json!({"role": "user", "content": text});
    let first = user(
        "river stone lantern copper falcon meadow ember velvet quiet signal window marble harbor \
         orchard thunder violet autumn canyon silver garden, which of these is heaviest?",
    );
    // With thinking on: the template then drops a turn's thinking from the history.
    let prompt = |messages: Vec<serde_json::Value>| Prompt::Chat {
        messages,
        tools: None,
        enable_thinking: Some(true),
    };
    let (_, _, none) = answer_with(&warm, prompt(vec![first.clone()]), 6);
    assert_eq!(none, 0, "nothing cached yet");
    let next = vec![
        first.clone(),
        serde_json::json!({"role": "assistant", "content": "The stone, surely."}),
        user("And the lightest?"),
    ];
    for (what, messages) in [("regenerated", vec![first.clone()]), ("next turn", next)] {
        let (wt, wl, reused) = answer_with(&warm, prompt(messages.clone()), 4);
        assert!(reused > 16, "{what}: reused {reused}, past the window");
        let (ct, cl, _) = answer_with(&cold, prompt(messages), 4);
        assert_eq!(wt, ct, "{what}: tokens");
        let d = max_diff(&wl, &cl);
        assert!(d <= 1e-4, "{what}: warm vs cold logprobs differ by {d}");
        eprintln!("{what}: reused {reused}, max |Δlogprob| {d:e}");
    }
    assert!(warm.shutdown(Duration::from_secs(20)));
    assert!(cold.shutdown(Duration::from_secs(20)));
}

/// Requests admitted together with one new system prompt: each misses the prefix cache at admission,
/// but the first checkpoints the system prompt while reading it, and the others, which read their prompts
/// after it, start from that checkpoint instead — the system prompt is read once — and answer as a cold
/// engine does. They are forced together: queued while the engine loads its model lazily, they join the
/// first step at once.
#[test]
fn requests_admitted_together_read_their_shared_system_prompt_once() {
    let _serial = serial();
    let mut config = EngineConfig::new(tiny());
    config.prefix_cache_bytes = Some(0);
    let cold = Engine::start(config).unwrap();
    cold.wait_ready().unwrap();
    let system = "river stone lantern copper falcon meadow ember velvet quiet signal window marble \
                  harbor orchard thunder violet autumn canyon silver garden";
    let questions = ["What is first?", "Which is last?", "Name one more, please."];
    let mut attempts = 0;
    let got = loop {
        attempts += 1;
        let mut config = EngineConfig::new(tiny());
        config.preload = false;
        let warm = Engine::start(config).unwrap();
        let rxs: Vec<_> = questions
            .iter()
            .map(|q| submit_for_answer(&warm, chat(system, q), 4))
            .collect();
        // Not loaded yet, with all three queued: once the model is in, the scheduler takes every queued
        // request before its first step. (Otherwise the load beat the submissions: try again.)
        let together = matches!(
            warm.status().state,
            EngineState::Unloaded | EngineState::Loading { .. }
        );
        let got: Vec<_> = rxs.into_iter().map(answer_of).collect();
        assert!(warm.shutdown(Duration::from_secs(20)));
        if together {
            break got;
        }
        assert!(
            attempts < 5,
            "the model loaded before three submissions, 5 times"
        );
    };
    let reused: Vec<usize> = got.iter().map(|g| g.2).collect();
    assert_eq!(
        reused.iter().filter(|&&n| n > 0).count(),
        2,
        "all but the first start from the checkpoint: {reused:?}"
    );
    for (q, (wt, wl, _)) in questions.iter().zip(&got) {
        let (ct, cl, _) = answer_with(&cold, chat(system, q), 4);
        assert_eq!(wt, &ct, "{q}: tokens");
        let d = max_diff(wl, &cl);
        assert!(d <= 1e-4, "{q}: warm vs cold logprobs differ by {d}");
    }
    assert!(cold.shutdown(Duration::from_secs(20)));
}

/// A cancelled request's cache is kept with exactly the tokens it holds: a prompt that continues what was
/// streamed before the cancel reuses it and answers as cold. A prefix cache with no room keeps nothing
/// (the byte budget holds): the same continuation is read in full.
#[test]
fn a_cancelled_request_leaves_a_sound_entry_and_the_byte_budget_holds() {
    let _serial = serial();
    let mut config = EngineConfig::new(tiny());
    // A small buffer: the engine notices the hang-up within a few tokens.
    config.event_buffer = 4;
    let warm = Engine::start(config).unwrap();
    warm.wait_ready().unwrap();
    let mut tight = EngineConfig::new(tiny());
    tight.prefix_cache_bytes = Some(1);
    let tight = Engine::start(tight).unwrap();
    tight.wait_ready().unwrap();
    let mut config = EngineConfig::new(tiny());
    config.prefix_cache_bytes = Some(0);
    let cold = Engine::start(config).unwrap();
    cold.wait_ready().unwrap();
    let a: Vec<u32> = std::iter::once(2)
        .chain((1..29u32).map(|k| 300 + (k * 37) % 400))
        .collect();
    let never_stop = |mut r: Request| {
        r.options.stop_tokens = vec![999_999];
        r
    };
    // The greedy continuation, from the cold engine.
    let mut r = never_stop(request(60));
    r.prompt = Prompt::Ids(a.clone());
    let mut rx = cold.submit(r).unwrap();
    let greedy = loop {
        match rx.blocking_recv().unwrap() {
            Event::Done(s) => break s.tokens,
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    };
    assert_eq!(greedy.len(), 60);
    // On the warm engine: 5 tokens of a long answer arrive, then the client hangs up.
    let mut r = never_stop(request(200));
    r.prompt = Prompt::Ids(a.clone());
    r.options.logprobs = true;
    let mut rx = warm.submit(r).unwrap();
    let mut arrived = 0;
    while arrived < 5 {
        match rx.blocking_recv().unwrap() {
            Event::Logprobs(_) => arrived += 1,
            Event::Done(_) => panic!("finished before the cancel"),
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    drop(rx);
    wait_for(&warm, "the cancel", |s| s.running == 0);
    // A prompt that continues the greedy answer further than the cancelled request got.
    let mut b = a.clone();
    b.extend(&greedy);
    b.extend((0..9).map(|k| 500 + k));
    let (wt, wl, reused) = answer_with(&warm, Prompt::Ids(b.clone()), 4);
    assert!(
        reused > a.len() && reused < a.len() + greedy.len(),
        "the cancelled request's cache was not reused: {reused}"
    );
    let (ct, cl, none) = answer_with(&cold, Prompt::Ids(b.clone()), 4);
    assert_eq!(none, 0, "the cold engine kept a cache");
    assert_eq!(wt, ct);
    let d = max_diff(&wl, &cl);
    assert!(
        d <= 1e-4,
        "after a cancel: warm vs cold logprobs differ by {d}"
    );
    eprintln!("cancelled after 5 tokens: {reused} tokens kept, max |Δlogprob| {d:e}");
    // No room: nothing is kept.
    let (t1, _, _) = answer_with(&tight, Prompt::Ids(a.clone()), 4);
    let mut c = a.clone();
    c.extend(&t1);
    c.extend((0..9).map(|k| 500 + k));
    let (_, _, none) = answer_with(&tight, Prompt::Ids(c), 2);
    assert_eq!(none, 0, "a prefix cache of 1 byte kept a cache");
    assert_eq!(tight.status().info.prefix_cache_entries, 0);
    for e in [warm, tight, cold] {
        assert!(e.shutdown(Duration::from_secs(20)));
    }
}

/// Prompts of 5, 23, 40 and 70 tokens (on both sides of the tiny models' sliding window of 16).
fn four_prompts() -> Vec<Prompt> {
    [5u32, 23, 40, 70]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            Prompt::Ids(
                std::iter::once(2)
                    .chain((1..len).map(|k| 300 + (k * 29 + i as u32 * 13) % 600))
                    .collect(),
            )
        })
        .collect()
}

/// The answers (tokens, top-5 logprobs) of `prompts`, read in prefill steps of `prefill_step`, on an
/// engine that reads one prompt at a time and on one that takes them all at once (queued while it
/// loads its model, so that its first step sees them all), and the most prompts the second read in one
/// forward.
fn alone_and_together(
    dir: &Path,
    prompts: &[Prompt],
    prefill_step: usize,
) -> (Vec<Answer>, Vec<Answer>, usize) {
    let submit = |engine: &Engine, p: &Prompt| {
        let mut r = request(12);
        r.prompt = p.clone();
        r.options.logprobs = true;
        r.options.top_logprobs = 5;
        r.options.prefill_step = prefill_step;
        engine.submit(r).unwrap()
    };
    let mut config = EngineConfig::new(dir);
    config.max_sequences = 1;
    let lone = Engine::start(config).unwrap();
    lone.wait_ready().unwrap();
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| answer_of(submit(&lone, p)))
        .collect();
    assert_eq!(lone.status().info.largest_prefill_batch, 1);
    assert!(lone.shutdown(Duration::from_secs(20)));
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut config = EngineConfig::new(dir);
        config.max_sequences = prompts.len();
        config.preload = false;
        let batched = Engine::start(config).unwrap();
        let rxs: Vec<_> = prompts.iter().map(|p| submit(&batched, p)).collect();
        // Not loaded yet, with all of them queued: the first step takes them all.
        let queued = matches!(
            batched.status().state,
            EngineState::Unloaded | EngineState::Loading { .. }
        );
        let got: Vec<_> = rxs.into_iter().map(answer_of).collect();
        let largest = batched.status().info.largest_prefill_batch;
        assert!(batched.shutdown(Duration::from_secs(20)));
        if queued {
            return (alone, got, largest);
        }
        assert!(
            attempts < 5,
            "the model loaded before the submissions, 5 times"
        );
    }
}

/// Prompts that arrive together are read together: four prompts of 5 to 70 tokens, queued while the
/// engine loads its model, are read in one packed forward (`largest_prefill_batch`: one pass over the
/// weights, not four) and each answers exactly as it does on an engine that reads one prompt at a time:
/// the same tokens, top-5 logprobs within 1e-4. On the dense and the MoE fixture, in f32 and 4-bit.
#[test]
fn prompts_sent_together_are_read_in_one_forward_and_answer_as_alone() {
    let _serial = serial();
    let root = tiny().parent().unwrap().to_path_buf();
    let step = jemma_engine::generate::GenerateOptions::default().prefill_step;
    for name in ["tiny", "tiny-q4", "moe", "moe-q4"] {
        let (alone, together, largest) =
            alone_and_together(&root.join(name), &four_prompts(), step);
        assert_eq!(
            largest, 4,
            "{name}: the four prompts were not read in one forward"
        );
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a.0, t.0, "{name}: prompt {i}: tokens");
            let d = max_diff(&a.1, &t.1);
            assert!(d <= 1e-4, "{name}: prompt {i}: logprobs differ by {d}");
        }
    }
}

/// The last chunk a step's budget cannot hold whole is cut to what is left, as vLLM cuts it, and read in
/// the same forward: in steps of 48 tokens, the prompts of 5 and 23 tokens leave 22 (4 and 22 are read,
/// each prompt's last token is the first step's), so the third prompt's 39 are cut to 22 and read beside
/// them (3 in one forward; without the cut it waited for the next step and the forward read 2). Each
/// answer, its prompt read in other chunks than alone, is the same: tokens, top-5 logprobs within 1e-4.
#[test]
fn a_chunk_the_step_cannot_hold_is_cut_to_what_is_left() {
    let _serial = serial();
    let root = tiny().parent().unwrap().to_path_buf();
    for name in ["tiny", "moe-q4"] {
        let (alone, together, largest) = alone_and_together(&root.join(name), &four_prompts(), 48);
        assert_eq!(largest, 3, "{name}: the third prompt was not cut to fit");
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a.0, t.0, "{name}: prompt {i}: tokens");
            let d = max_diff(&a.1, &t.1);
            assert!(d <= 1e-4, "{name}: prompt {i}: logprobs differ by {d}");
        }
    }
}

/// Checkpoints taken in a packed read are sound: three chats with different system prompts, queued while
/// the engine loads, are read together (each chunk ends at its system prompt's checkpoint); then a new
/// chat with each system prompt and another question starts from that checkpoint and answers exactly as
/// on an engine without a prefix cache.
#[test]
fn checkpoints_taken_in_a_packed_read_serve_the_next_conversation() {
    let _serial = serial();
    let submit = |engine: &Engine, p: Prompt| {
        let mut r = request(4);
        r.prompt = p;
        r.options.logprobs = true;
        r.options.top_logprobs = 5;
        engine.submit(r).unwrap()
    };
    let systems = [
        "river stone lantern copper falcon meadow ember velvet quiet signal",
        "window marble harbor orchard thunder violet autumn canyon silver garden river stone lantern",
        "copper falcon meadow ember velvet quiet signal window marble harbor orchard thunder violet \
         autumn canyon silver",
    ];
    let mut attempts = 0;
    let (warm, largest) = loop {
        attempts += 1;
        let mut config = EngineConfig::new(tiny());
        config.preload = false;
        let warm = Engine::start(config).unwrap();
        let rxs: Vec<_> = systems
            .iter()
            .map(|s| submit(&warm, chat(s, "What is first?")))
            .collect();
        let queued = matches!(
            warm.status().state,
            EngineState::Unloaded | EngineState::Loading { .. }
        );
        for rx in rxs {
            answer_of(rx);
        }
        let largest = warm.status().info.largest_prefill_batch;
        if queued {
            break (warm, largest);
        }
        assert!(warm.shutdown(Duration::from_secs(20)));
        assert!(
            attempts < 5,
            "the model loaded before three submissions, 5 times"
        );
    };
    assert_eq!(largest, 3, "the three prompts were not read in one forward");
    let mut config = EngineConfig::new(tiny());
    config.prefix_cache_bytes = Some(0);
    let cold = Engine::start(config).unwrap();
    cold.wait_ready().unwrap();
    for s in systems {
        let (wt, wl, cached) = answer_of(submit(&warm, chat(s, "Which is last, then?")));
        let (ct, cl, none) = answer_of(submit(&cold, chat(s, "Which is last, then?")));
        assert!(cached > 0 && none == 0, "{s}: cached {cached}, cold {none}");
        assert_eq!(wt, ct, "{s}: tokens");
        let d = max_diff(&wl, &cl);
        assert!(d <= 1e-4, "{s}: warm vs cold logprobs differ by {d}");
    }
    assert!(warm.shutdown(Duration::from_secs(20)));
    assert!(cold.shutdown(Duration::from_secs(20)));
}
