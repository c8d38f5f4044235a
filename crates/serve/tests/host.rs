//! The serving core's host, driven through a test-double runner (no model): the lifecycle every engine
//! inherits — preload and lazy load, a failed preload, a memory refusal retried at the next request, the
//! idle keep-alive unload with a transparent reload, the bounded queue, and cancellation when a receiver
//! is dropped. The real engines run the same code (crates/engine/tests/runtime.rs, tests/e2e).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jemma_chat::event::{EngineFailure, Event};
use jemma_serve::host::{
    EngineState, Host, HostConfig, LoadError, ModelRunner, Progress, SeqOutput, Status,
    SubmitError, Tally,
};
use jemma_serve::memory::{MemoryConfig, MemoryGovernor, PressureSource};
use serde::Serialize;

#[derive(Default)]
struct Counters {
    loads: AtomicUsize,
    unloads: AtomicUsize,
    releases: AtomicUsize,
    /// The size of every batch stepped.
    batches: Mutex<Vec<usize>>,
}

/// Emits `n` numbered pieces per request, one per step (each step taking `step`); its model is the load
/// count; runs up to `max_sequences` requests in one batch.
struct Fake {
    counters: Arc<Counters>,
    footprint: u64,
    /// Bytes each sequence adds to the footprint (0: the plan cannot shrink).
    per_sequence: u64,
    fail_load: bool,
    /// Panic in `load` (a runner bug), instead of failing.
    panic_load: bool,
    step: Duration,
    /// Steps each request takes before its first piece, sending nothing (a prompt read in chunks).
    silent: usize,
    max_sequences: usize,
    /// Held by a test to stop the model thread at its next step.
    gate: Arc<Mutex<()>>,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Info {
    planned: Option<u64>,
}

struct Seq {
    model: usize,
    n: usize,
    done: usize,
    /// Silent steps left.
    silent: usize,
}

impl ModelRunner for Fake {
    type Model = usize;
    type Request = usize;
    type Summary = usize;
    type Info = Info;
    type Sequence = Seq;

    fn plan(&mut self, info: &mut Info) -> Result<Option<u64>, LoadError> {
        let bytes = self.footprint + self.per_sequence * self.max_sequences as u64;
        info.planned = Some(bytes);
        Ok(Some(bytes))
    }

    fn shrink(&mut self, info: &mut Info) -> Option<u64> {
        if self.per_sequence == 0 || self.max_sequences <= 1 {
            return None;
        }
        self.max_sequences /= 2;
        self.plan(info).ok().flatten()
    }

    fn load(&mut self, progress: &Progress, _: &mut Info) -> Result<(usize, usize), LoadError> {
        if self.fail_load {
            return Err(LoadError::Failed("broken weights".into()));
        }
        assert!(!self.panic_load, "a runner bug while loading");
        progress(0.5);
        progress(1.0);
        let n = self.counters.loads.fetch_add(1, Ordering::SeqCst) + 1;
        Ok((n, 4096))
    }

    fn max_sequences(&self, _: &usize) -> usize {
        self.max_sequences
    }

    fn admit(&mut self, model: &mut usize, n: usize, ctx: usize) -> Result<Seq, EngineFailure> {
        assert_eq!(ctx, 4096, "the host passes the context the load reported");
        if n == 0 {
            return Err(EngineFailure::InvalidRequest("zero tokens".into()));
        }
        Ok(Seq {
            model: *model,
            n,
            done: 0,
            silent: self.silent,
        })
    }

    fn step(
        &mut self,
        _: &mut usize,
        batch: &mut [&mut Seq],
        out: &mut [SeqOutput<usize>],
    ) -> Result<(), EngineFailure> {
        let _held = self.gate.lock().unwrap();
        assert!(batch.len() <= self.max_sequences, "the batch fits");
        self.counters.batches.lock().unwrap().push(batch.len());
        std::thread::sleep(self.step);
        for (seq, o) in batch.iter_mut().zip(out.iter_mut()) {
            if seq.silent > 0 {
                seq.silent -= 1;
                continue;
            }
            o.send(Event::Content(format!("{}:{}", seq.model, seq.done)));
            seq.done += 1;
            if seq.done == seq.n {
                o.finish(seq.n);
            }
        }
        Ok(())
    }

    /// A request's prompt is its number (0 is refused, as admission refuses it).
    fn prompt_tokens(&mut self, _: &mut usize, n: &usize) -> Result<usize, EngineFailure> {
        match n {
            0 => Err(EngineFailure::InvalidRequest("zero tokens".into())),
            n => Ok(*n),
        }
    }

    fn release(&mut self, _: &mut usize, _: Seq) {
        self.counters.releases.fetch_add(1, Ordering::SeqCst);
    }

    fn tally(n: &usize) -> Tally {
        Tally {
            prompt_tokens: 10,
            cached_tokens: 4,
            completion_tokens: *n,
            ..Default::default()
        }
    }

    fn unload(&mut self, _: usize) {
        self.counters.unloads.fetch_add(1, Ordering::SeqCst);
    }
}

fn fake() -> (Fake, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    (
        Fake {
            counters: counters.clone(),
            footprint: 100 << 20,
            per_sequence: 0,
            fail_load: false,
            panic_load: false,
            step: Duration::ZERO,
            silent: 0,
            max_sequences: 1,
            gate: Arc::new(Mutex::new(())),
        },
        counters,
    )
}

fn config() -> HostConfig {
    HostConfig {
        name: "fake".into(),
        thread_name: "fake-model".into(),
        queue_capacity: 2,
        event_buffer: 4,
        keep_alive: None,
        preload: true,
        memory: None,
        stall_timeout: Duration::from_secs(60),
    }
}

/// Runs a request to its end: (content pieces, Done's summary or the error).
fn run(host: &Host<Fake>, n: usize) -> (Vec<String>, Result<usize, EngineFailure>) {
    let mut rx = host.submit(n).unwrap();
    let mut pieces = vec![];
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Content(c) => pieces.push(c),
            Event::Done(s) => return (pieces, Ok(s)),
            Event::Error(e) => return (pieces, Err(e)),
            _ => {}
        }
    }
    panic!("the stream ended without Done or Error");
}

/// Waits (woken by the host's status changes) until `f` holds of its state; fails the test after 10 s.
fn wait_for(host: &Host<Fake>, what: &str, f: impl Fn(&EngineState) -> bool) {
    assert!(
        host.wait_until(Duration::from_secs(10), |s| f(&s.state)),
        "timed out waiting for {what}: {:?}",
        host.status().state
    );
}

/// Waits until `f` holds of the host's status (`running`, token counts: what the model thread
/// publishes); fails the test with `what` after 10 s.
fn wait_status(host: &Host<Fake>, what: &str, f: impl Fn(&Status<Info>) -> bool) {
    assert!(host.wait_until(Duration::from_secs(10), f), "{what}");
}

#[test]
fn preloads_serves_and_counts() {
    let (r, counters) = fake();
    let host = Host::start(config(), r, Info::default()).unwrap();
    host.wait_ready().unwrap();
    let s = host.status();
    assert_eq!(s.state, EngineState::Ready);
    assert_eq!(s.context_length, 4096);
    assert_eq!(s.info.planned, Some(100 << 20));
    assert_eq!(
        run(&host, 3),
        (vec!["1:0".into(), "1:1".into(), "1:2".into()], Ok(3))
    );
    // A request error is the client's, and the host keeps serving.
    assert_eq!(
        run(&host, 0).1,
        Err(EngineFailure::InvalidRequest("zero tokens".into()))
    );
    assert_eq!(run(&host, 1).1, Ok(1));
    let s = host.status();
    assert_eq!((s.requests, s.generated_tokens), (2, 4));
    assert_eq!((s.prompt_tokens, s.cached_prompt_tokens), (20, 8));
    assert_eq!(counters.loads.load(Ordering::SeqCst), 1);
    // The status serialises flat, as /health and the CLI show it.
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v["state"], "ready");
    assert_eq!(v["planned"], 100 << 20);
}

#[test]
fn a_failed_preload_is_final_and_refuses_requests() {
    let (mut r, _) = fake();
    r.fail_load = true;
    let host = Host::start(config(), r, Info::default()).unwrap();
    assert_eq!(host.wait_ready(), Err("broken weights".into()));
    match host.submit(1) {
        Err(SubmitError::Unavailable(m)) => assert_eq!(m, "broken weights"),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

/// A runner that panics while loading ends its thread: a waiter is told so instead of waiting forever,
/// and the host shuts down at once.
#[test]
fn a_panic_while_loading_ends_the_wait() {
    let (mut r, _) = fake();
    r.panic_load = true;
    let host = Host::start(config(), r, Info::default()).unwrap();
    let err = host.wait_ready().unwrap_err();
    assert!(err.contains("ended while loading"), "{err}");
    assert!(host.shutdown(Duration::from_secs(10)));
}

#[test]
fn lazy_load_then_idle_keep_alive_unloads_and_the_next_request_reloads() {
    let (r, counters) = fake();
    let governor = MemoryGovernor::with_available(
        MemoryConfig {
            pressure: PressureSource::Off,
            ..Default::default()
        },
        Box::new(|| 64 << 30),
    );
    let mut cfg = config();
    cfg.preload = false;
    // Long enough that a busy 2-core machine still sees the model loaded right after a request.
    cfg.keep_alive = Some(Duration::from_secs(1));
    cfg.memory = Some(governor.clone());
    let host = Host::start(cfg, r, Info::default()).unwrap();
    assert_eq!(host.status().state, EngineState::Unloaded);
    assert_eq!(
        counters.loads.load(Ordering::SeqCst),
        0,
        "nothing loaded before the first request"
    );
    assert_eq!(governor.status().reserved_bytes, 0);
    assert_eq!(run(&host, 1).0, vec!["1:0".to_string()]);
    assert_eq!(governor.status().reserved_bytes, 100 << 20);
    wait_for(&host, "the idle unload", |s| *s == EngineState::Unloaded);
    assert_eq!(counters.unloads.load(Ordering::SeqCst), 1);
    assert_eq!(
        governor.status().reserved_bytes,
        0,
        "the reservation is released with the model"
    );
    // Transparent reload: a second load, and the request is served by it.
    assert_eq!(run(&host, 1).0, vec!["2:0".to_string()]);
    assert_eq!(host.status().state, EngineState::Ready);
}

#[test]
fn a_memory_refusal_is_retried_at_the_next_request() {
    let (r, counters) = fake();
    let governor = MemoryGovernor::new(MemoryConfig {
        limit_bytes: Some(64 << 20),
        headroom_bytes: 0,
        pressure: PressureSource::Off,
        ..Default::default()
    });
    let mut cfg = config();
    cfg.memory = Some(governor.clone());
    let host = Host::start(cfg, r, Info::default()).unwrap();
    host.wait_ready().unwrap();
    let s = host.status();
    assert_eq!(s.state, EngineState::Unloaded, "refused, not failed: {s:?}");
    let err = s.last_error.unwrap();
    assert!(err.starts_with("insufficient memory"), "{err}");
    assert_eq!(
        counters.loads.load(Ordering::SeqCst),
        0,
        "not a byte was loaded"
    );
    // The next request tries again (and is refused again, as an engine fault with the reason).
    let (_, r) = run(&host, 1);
    match r {
        Err(EngineFailure::Fault(m)) => assert!(m.contains("insufficient memory"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(governor.status().reserved_bytes, 0);
}

/// A budget too small for the configured batch loads the model with fewer sequences (each sequence's cache
/// is part of the footprint) rather than refusing it, and reports the batch size it settled on.
#[test]
fn a_budget_too_small_for_the_batch_loads_with_fewer_sequences() {
    let (mut r, counters) = fake();
    r.footprint = 16 << 20;
    r.per_sequence = 10 << 20;
    r.max_sequences = 8;
    let governor = MemoryGovernor::new(MemoryConfig {
        limit_bytes: Some(64 << 20),
        headroom_bytes: 0,
        pressure: PressureSource::Off,
        ..Default::default()
    });
    let mut cfg = config();
    cfg.memory = Some(governor.clone());
    let host = Host::start(cfg, r, Info::default()).unwrap();
    host.wait_ready().unwrap();
    let s = host.status();
    assert_eq!(s.state, EngineState::Ready, "{s:?}");
    assert_eq!(s.max_sequences, 4, "8 x 10 MiB did not fit 64 MiB; 4 do");
    assert_eq!(s.info.planned, Some(56 << 20));
    assert_eq!(governor.status().reserved_bytes, 56 << 20);
    assert_eq!(counters.loads.load(Ordering::SeqCst), 1);
    assert_eq!(run(&host, 2).1.unwrap(), 2);
}

#[test]
fn the_queue_is_bounded_and_a_dropped_receiver_cancels() {
    let (mut r, counters) = fake();
    r.step = Duration::from_millis(5);
    let gate = r.gate.clone();
    let host = Host::start(config(), r, Info::default()).unwrap();
    host.wait_ready().unwrap();
    // Admit the first request, then hold the model thread at its next step; the queue (capacity 2) fills.
    let first = host.submit(1000).unwrap();
    wait_status(&host, "the thread never took the first job", |s| {
        s.running > 0
    });
    let held = gate.lock().unwrap();
    let a = host.submit(1).unwrap();
    let b = host.submit(1).unwrap();
    assert!(matches!(host.submit(1), Err(SubmitError::QueueFull)));
    assert_eq!(host.status().queued, 2);
    // Hang up on the long request: it stops at its next event instead of producing 1000.
    drop(first);
    drop(held);
    for mut rx in [a, b] {
        let mut done = None;
        while let Some(ev) = rx.blocking_recv() {
            if let Event::Done(n) = ev {
                done = Some(n);
            }
        }
        assert_eq!(done, Some(1));
    }
    assert!(host.status().generated_tokens < 1000);
    assert_eq!(
        counters.releases.load(Ordering::SeqCst),
        3,
        "the cancelled sequence's cache slot was freed too"
    );
}

#[test]
fn the_thread_ends_when_every_handle_is_dropped() {
    let (r, counters) = fake();
    let host = Host::start(config(), r, Info::default()).unwrap();
    host.wait_ready().unwrap();
    let stopped = host.stopped();
    drop(host);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), stopped)
            .await
            .expect("the model thread ended")
    });
    assert_eq!(counters.loads.load(Ordering::SeqCst), 1);
}

#[test]
fn a_broken_model_loaded_lazily_fails_for_good() {
    let (mut r, _) = fake();
    r.fail_load = true;
    let mut cfg = config();
    cfg.preload = false;
    let host = Host::start(cfg, r, Info::default()).unwrap();
    assert_eq!(host.status().state, EngineState::Unloaded);
    assert_eq!(
        run(&host, 1).1,
        Err(EngineFailure::Fault("broken weights".into()))
    );
    // Never loaded once: a hard failure is final (health says failed; requests go elsewhere at once).
    assert_eq!(
        host.status().state,
        EngineState::Failed {
            error: "broken weights".into()
        }
    );
    assert!(matches!(host.submit(1), Err(SubmitError::Unavailable(_))));
}

/// Collects a request's pieces and summary from its receiver.
fn collect(mut rx: tokio::sync::mpsc::Receiver<Event<usize>>) -> (Vec<String>, Option<usize>) {
    let mut pieces = vec![];
    let mut done = None;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Content(c) => pieces.push(c),
            Event::Done(n) => done = Some(n),
            other => panic!("{other:?}"),
        }
    }
    (pieces, done)
}

#[test]
fn requests_share_steps_up_to_the_batch_size_and_newcomers_join_between_steps() {
    let (mut r, counters) = fake();
    r.max_sequences = 3;
    r.step = Duration::from_millis(2);
    let mut cfg = config();
    cfg.queue_capacity = 8;
    let host = Host::start(cfg, r, Info::default()).unwrap();
    host.wait_ready().unwrap();
    assert_eq!(host.status().max_sequences, 3);
    // Every client reads as it goes (its own thread), so no sequence sits out for backpressure.
    let long = std::thread::spawn({
        let rx = host.submit(40).unwrap();
        move || collect(rx)
    });
    let t0 = Instant::now();
    while host.status().generated_tokens == 0 && counters.batches.lock().unwrap().len() < 5 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1));
    }
    // Joining mid-way: these arrive while the long one runs, and the fourth waits for a free place.
    let readers: Vec<_> = [5, 6, 7]
        .iter()
        .map(|&n| {
            let rx = host.submit(n).unwrap();
            std::thread::spawn(move || collect(rx))
        })
        .collect();
    let outs: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    for (out, n) in outs.iter().zip([5, 6, 7]) {
        let want: Vec<String> = (0..n).map(|i| format!("1:{i}")).collect();
        assert_eq!(out, &(want, Some(n)), "each stream is whole and in order");
    }
    let (long, n) = long.join().unwrap();
    assert_eq!((long.len(), n), (40, Some(40)));
    let batches = counters.batches.lock().unwrap().clone();
    assert_eq!(batches.iter().max(), Some(&3), "{batches:?}");
    assert!(batches[0] == 1, "the first request ran alone: {batches:?}");
    // 40 + 5 + 6 + 7 = 58 tokens in far fewer steps than one request at a time would take.
    assert!(batches.len() < 58, "{} steps", batches.len());
    wait_status(&host, "the batch never emptied", |s| s.running == 0);
}

/// A step that sends nothing (a prompt chunk read, a token held back) is reported as progress, so a
/// consumer's stall deadline can tell a long prompt or a long tool call from a stalled engine.
#[test]
fn a_step_that_sends_nothing_is_progress() {
    let (mut r, _) = fake();
    r.silent = 3;
    let host = Host::start(config(), r, Info::default()).unwrap();
    host.wait_ready().unwrap();
    let mut rx = host.submit(2).unwrap();
    let mut got = vec![];
    while let Some(ev) = rx.blocking_recv() {
        got.push(match ev {
            Event::Progress => "progress".to_string(),
            Event::Content(c) => c,
            Event::Done(n) => format!("done {n}"),
            other => panic!("{other:?}"),
        });
    }
    assert_eq!(
        got,
        ["progress", "progress", "progress", "1:0", "1:1", "done 2"]
    );
}

#[test]
fn a_client_that_stops_reading_does_not_stall_the_others() {
    let (mut r, _) = fake();
    r.max_sequences = 2;
    let host = Host::start(config(), r, Info::default()).unwrap();
    host.wait_ready().unwrap();
    // event_buffer is 4: this client takes nothing, so its sequence sits out once 4 events wait.
    let stalled = host.submit(100).unwrap();
    let (pieces, done) = collect(host.submit(50).unwrap());
    assert_eq!((pieces.len(), done), (50, Some(50)));
    // The stalled one resumes when its client reads.
    let (pieces, done) = collect(stalled);
    assert_eq!((pieces.len(), done), (100, Some(100)));
}

#[test]
fn a_client_that_holds_its_stream_without_reading_is_cut_after_the_stall_timeout() {
    let (mut r, counters) = fake();
    r.max_sequences = 1;
    let mut cfg = config();
    cfg.stall_timeout = Duration::from_millis(300);
    let host = Host::start(cfg, r, Info::default()).unwrap();
    host.wait_ready().unwrap();
    // Holds its receiver, reads nothing: its 4-event buffer fills, then it stalls the only slot.
    let stalled = host.submit(1000).unwrap();
    let t0 = Instant::now();
    let (pieces, done) = collect(host.submit(3).unwrap());
    assert_eq!((pieces.len(), done), (3, Some(3)), "the queued request ran");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "after the timeout"
    );
    assert_eq!(counters.releases.load(Ordering::SeqCst), 2);
    // The stalled one got its buffered events and then its stream ended, without Done.
    let (pieces, done) = collect(stalled);
    assert_eq!((pieces.len(), done), (4, None));
}

#[test]
fn counts_are_answered_while_the_batch_is_full_and_load_a_lazy_model() {
    // Lazy: a count alone loads the model (the tokenizer and template come with it).
    let (mut r, counters) = fake();
    r.step = Duration::from_millis(2);
    let mut cfg = config();
    cfg.preload = false;
    cfg.queue_capacity = 8;
    let host = Host::start(cfg, r, Info::default()).unwrap();
    assert_eq!(host.count(7).unwrap().blocking_recv().unwrap().unwrap(), 7);
    assert_eq!(counters.loads.load(Ordering::SeqCst), 1);
    assert!(matches!(
        host.count(0).unwrap().blocking_recv().unwrap(),
        Err(EngineFailure::InvalidRequest(_))
    ));
    // One sequence at a time: a long request fills the batch and another waits for its slot, yet a
    // count sent after both is answered before either ends, and takes no slot.
    let long = host.submit(200).unwrap();
    wait_status(&host, "the long request never ran", |s| s.running > 0);
    let queued = host.submit(3).unwrap();
    let counted = host.count(42).unwrap().blocking_recv().unwrap().unwrap();
    assert_eq!(counted, 42);
    let steps_when_counted = counters.batches.lock().unwrap().len();
    assert!(
        steps_when_counted < 200,
        "the count waited for the long request"
    );
    let (long, _) = collect(long);
    let (queued, n) = collect(queued);
    assert_eq!((long.len(), queued.len(), n), (200, 3, Some(3)));
    let batches = counters.batches.lock().unwrap().clone();
    assert_eq!(batches.iter().max(), Some(&1), "a count never took a slot");
}

#[test]
fn requests_waiting_for_a_slot_stay_within_the_queue_bound_while_counts_pass() {
    // One sequence at a time, room for two waiting requests. The thread reads waiting requests out of
    // the queue (to reach counts behind them), but they still take the queue's places.
    let (mut r, _) = fake();
    r.step = Duration::from_millis(2);
    let host = Host::start(config(), r, Info::default()).unwrap();
    host.wait_ready().unwrap();
    let long = host.submit(500).unwrap();
    wait_status(&host, "the long request never ran", |s| s.running > 0);
    let a = host.submit(2).unwrap();
    let b = host.submit(2).unwrap();
    // A count behind them is answered, which means the thread has taken both out of the channel.
    assert_eq!(host.count(9).unwrap().blocking_recv().unwrap().unwrap(), 9);
    assert_eq!(host.status().queued, 2);
    assert!(matches!(host.submit(2), Err(SubmitError::QueueFull)));
    // A waiting client that goes away gives its place back.
    drop(a);
    let t0 = Instant::now();
    let c = loop {
        match host.submit(3) {
            Ok(c) => break c,
            Err(SubmitError::QueueFull) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "the place never came back"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("{e}"),
        }
    };
    drop(long);
    assert_eq!(collect(b).1, Some(2));
    assert_eq!(collect(c).1, Some(3));
    assert_eq!(host.status().queued, 0);
}
