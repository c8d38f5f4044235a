//! Per-tier circuit breaker.
//!
//! Each tier (fast, primary, heavy) gets its own breaker so that a dead or overloaded backend is skipped quickly
//! and the router falls through the chain heavy → primary → fast → 503 instead of making every request wait for
//! a timeout.
//!
//! State machine:
//!
//! ```text
//!            N failures within W                 cooldown C elapsed
//!  CLOSED ─────────────────────────▶ OPEN ─────────────────────────▶ HALF-OPEN
//!    ▲                                 ▲                                 │
//!    │            probe succeeded      │        probe failed             │
//!    └─────────────────────────────────┼─────────────────────────────────┤
//!                                      └─────────────────────────────────┘
//! ```
//!
//! * **Closed**: every request is let through. A failure is recorded with its timestamp; when `failure_threshold`
//!   failures fall within the last `window_secs`, the breaker opens. A success clears nothing: the breaker counts
//!   failures in a sliding time window rather than consecutive failures, so a backend that fails two requests in
//!   three while serving some will still trip it. Failures age out of the window on their own.
//! * **Open**: every request is rejected with the time left until the cooldown ends, which the gateway can send
//!   as `Retry-After`.
//! * **Half-open**: once the cooldown has elapsed, exactly one request (the probe) is let through; every other
//!   request is rejected until the probe is resolved. Probe success closes the breaker, probe failure opens it
//!   again for a fresh cooldown. A probe whose [`Permit`] is dropped unresolved (the client disconnected and the
//!   request future was cancelled) says nothing about the backend, so it frees the probe slot without counting
//!   as a failure; the next request becomes the probe and the breaker never stays stuck half-open.
//!
//! Transitions are lazy: Open becomes Half-open on the first call that looks at the breaker after the cooldown.
//! There is no timer task, so the breaker needs no runtime and costs one uncontended mutex lock per call.
//!
//! Time comes from a [`Clock`], so tests drive the breaker with a [`ManualClock`] instead of sleeping.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize, Serializer};

/// Longest window or cooldown honoured (one year). Larger or infinite values from a config file are clamped so
/// that `Instant + Duration` can never overflow and panic.
const MAX_CONFIG_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// Retry hint given while a half-open probe is in flight: its outcome is unknown and may close the breaker at
/// any moment, so clients are told to come back soon rather than after a whole cooldown.
const PROBE_RETRY_HINT: Duration = Duration::from_secs(1);

/// Breaker tuning, read from the gateway's config file; every field is optional there, and an unknown field is
/// an error so that a misspelt setting is not silently ignored.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Failures within `window_secs` that open the breaker (default 3). Zero is treated as 1.
    pub failure_threshold: u32,
    /// Length of the sliding failure window in seconds (default 30). Negative or NaN is treated as 0.
    pub window_secs: f64,
    /// How long the breaker stays open before letting a probe through, in seconds (default 30). Negative or NaN
    /// is treated as 0 (half-open immediately).
    pub cooldown_secs: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            window_secs: 30.0,
            cooldown_secs: 30.0,
        }
    }
}

impl BreakerConfig {
    /// The effective failure threshold: at least 1, since a threshold of 0 would mean "open without failing".
    pub fn threshold(&self) -> u32 {
        self.failure_threshold.max(1)
    }

    /// The sliding window as a [`Duration`], sanitised (see [`BreakerConfig::window_secs`]).
    pub fn window(&self) -> Duration {
        secs_to_duration(self.window_secs)
    }

    /// The cooldown as a [`Duration`], sanitised (see [`BreakerConfig::cooldown_secs`]).
    pub fn cooldown(&self) -> Duration {
        secs_to_duration(self.cooldown_secs)
    }
}

/// Config values come from users: map NaN and negatives to zero and clamp huge values instead of panicking.
fn secs_to_duration(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(secs.min(MAX_CONFIG_SECS))
    }
}

/// Source of the current time, abstracted so tests can move time by hand.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The real monotonic clock, read through tokio ([`now`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        now()
    }
}

/// The router's "now": tokio's clock as a [`std::time::Instant`]. It is the OS's monotonic clock
/// ([`Instant::now`]), except in a test whose runtime paused time (`#[tokio::test(start_paused = true)]`),
/// where cooldowns, Retry-After waits and first-token deadlines then all move with the test's virtual
/// sleeps instead of the wall clock. Needs no runtime.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A clock that only moves when told to; for tests of the breaker and of code that uses it.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    offset: Mutex<Duration>,
}

impl ManualClock {
    /// A clock frozen at the moment of creation.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        *lock(&self.offset) += by;
    }

    /// Moves the clock forward by `secs` seconds (convenience for tests written in seconds).
    pub fn advance_secs(&self, secs: f64) {
        self.advance(Duration::from_secs_f64(secs));
    }

    /// How far the clock has been advanced since creation.
    pub fn elapsed(&self) -> Duration {
        *lock(&self.offset)
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *lock(&self.offset)
    }
}

/// Locks a mutex, ignoring poisoning: the breaker never panics while holding its lock (callbacks run outside
/// it), so the data behind a poisoned lock is still consistent, and a breaker must keep working regardless.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a breaker stands, as seen by [`CircuitBreaker::state`].
///
/// Serialises as the plain string of [`BreakerState::as_str`] (`"closed"`, `"open"`, `"half_open"`) for
/// `/health` and metrics labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow normally.
    Closed,
    /// Requests are rejected until `until`.
    Open {
        /// When the cooldown ends and a probe will be allowed.
        until: Instant,
        /// Time left until `until`, measured when the state was read.
        remaining: Duration,
    },
    /// The cooldown is over; one probe request decides whether to close or reopen.
    HalfOpen {
        /// Whether the probe has been handed out and not yet resolved (further requests are rejected).
        probe_in_flight: bool,
    },
}

impl BreakerState {
    /// Stable lowercase name for health output and metrics: `closed`, `open` or `half_open`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen { .. } => "half_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for BreakerState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Returned by [`CircuitBreaker::try_acquire`] when the breaker does not let a request through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// How long until a request may be let through again: the rest of the cooldown while open, or a short hint
    /// while a half-open probe is in flight.
    pub retry_after: Duration,
}

impl Rejected {
    /// `retry_after` rounded up to whole seconds and at least 1, as the HTTP `Retry-After` header wants.
    pub fn retry_after_secs_ceil(&self) -> u64 {
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
        secs.max(1)
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "circuit breaker open; retry after {:.1}s",
            self.retry_after.as_secs_f64()
        )
    }
}

impl std::error::Error for Rejected {}

/// One transition, as reported in a [`BreakerSnapshot`].
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct TransitionInfo {
    /// State left (`closed`, `open`, `half_open`).
    pub from: &'static str,
    /// State entered.
    pub to: &'static str,
    /// Seconds between the transition and the snapshot.
    pub secs_ago: f64,
}

/// Point-in-time view of a breaker for `/health` and Prometheus. Counters are monotonic over the breaker's life
/// ([`CircuitBreaker::reset`] keeps them), as Prometheus counters must be.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct BreakerSnapshot {
    /// The state (serialised as `closed`, `open` or `half_open`).
    pub state: BreakerState,
    /// Failures currently inside the sliding window (only tracked while closed; 0 otherwise).
    pub recent_failures: u32,
    /// The effective failure threshold, so a reader can tell how close the breaker is to opening.
    pub failure_threshold: u32,
    /// Times the breaker has opened, counting both Closed → Open and a failed probe's Half-open → Open.
    pub opened_count: u64,
    /// Seconds until a request would be let through, when one would be rejected right now; `None` otherwise.
    pub retry_after_secs: Option<f64>,
    /// Failures reported through [`Permit::failure`], in any state.
    pub total_failures: u64,
    /// Successes reported through [`Permit::success`], in any state.
    pub total_successes: u64,
    /// Requests turned away by [`CircuitBreaker::try_acquire`].
    pub total_rejected: u64,
    /// Number of state transitions.
    pub transitions: u64,
    /// The most recent transition, if any.
    pub last_transition: Option<TransitionInfo>,
}

/// The breaker's internal state; `Open` and `HalfOpen` carry only what the state machine needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

impl Phase {
    /// The public view of this phase, read at `now`.
    fn at(self, now: Instant) -> BreakerState {
        match self {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } => BreakerState::Open {
                until,
                remaining: until.saturating_duration_since(now),
            },
            Phase::HalfOpen { probe_in_flight } => BreakerState::HalfOpen { probe_in_flight },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen { .. } => "half_open",
        }
    }
}

/// A transition to report to the hooks once the state lock has been released.
type Fired = Vec<(&'static str, &'static str)>;

/// Callback for [`CircuitBreaker::on_transition`], called with the old and new state names.
pub type TransitionHook = Box<dyn Fn(&str, &str) + Send + Sync>;

/// How hooks are stored: shared, so the list can be cloned cheaply and called without holding a lock.
type Hook = dyn Fn(&str, &str) + Send + Sync;

struct State {
    phase: Phase,
    /// Timestamps of the most recent failures while closed, oldest first. Only the last `threshold` matter (the
    /// breaker opens when the oldest of them is still inside the window), so the queue never grows beyond that.
    failures: VecDeque<Instant>,
    /// Identifies the current probe. Bumped when a probe is handed out and on reset, so that a permit from an
    /// earlier probe or from before a reset cannot close, reopen or free the slot of a later one.
    epoch: u64,
    total_failures: u64,
    total_successes: u64,
    total_rejected: u64,
    opened_count: u64,
    transitions: u64,
    last_transition: Option<(&'static str, &'static str, Instant)>,
}

struct Shared {
    config: BreakerConfig,
    threshold: u32,
    window: Duration,
    cooldown: Duration,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    hooks: Mutex<Vec<Arc<Hook>>>,
}

/// How a permit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
}

/// Whether a permit is the half-open probe (and which one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PermitKind {
    Normal,
    Probe { epoch: u64 },
}

/// Thread-safe circuit breaker for one tier.
///
/// Cloning is cheap and the clones share one state, so the breaker can be stored in the router and handed to
/// request tasks freely.
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

impl CircuitBreaker {
    /// A closed breaker on the system clock.
    pub fn new(config: BreakerConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// A closed breaker reading time from `clock` (a [`ManualClock`] in tests).
    pub fn with_clock(config: BreakerConfig, clock: Arc<dyn Clock>) -> Self {
        let shared = Shared {
            threshold: config.threshold(),
            window: config.window(),
            cooldown: config.cooldown(),
            config,
            clock,
            state: Mutex::new(State {
                phase: Phase::Closed,
                failures: VecDeque::new(),
                epoch: 0,
                total_failures: 0,
                total_successes: 0,
                total_rejected: 0,
                opened_count: 0,
                transitions: 0,
                last_transition: None,
            }),
            hooks: Mutex::new(Vec::new()),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// The configuration the breaker was built with.
    pub fn config(&self) -> &BreakerConfig {
        &self.shared.config
    }

    /// Asks to send one request to the tier.
    ///
    /// On success the returned [`Permit`] must be resolved with [`Permit::success`] or [`Permit::failure`] once
    /// the outcome is known; dropping it unresolved counts as neither (see [`Permit`]).
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        let shared = &self.shared;
        let now = shared.clock.now();
        let mut fired = Fired::new();
        let result = {
            let mut st = lock(&shared.state);
            shared.advance(&mut st, now, &mut fired);
            match st.phase {
                Phase::Closed => Ok(PermitKind::Normal),
                Phase::Open { until } => {
                    st.total_rejected += 1;
                    Err(Rejected {
                        retry_after: until.saturating_duration_since(now),
                    })
                }
                Phase::HalfOpen {
                    probe_in_flight: true,
                } => {
                    st.total_rejected += 1;
                    Err(Rejected {
                        retry_after: shared.probe_retry_hint(),
                    })
                }
                Phase::HalfOpen {
                    probe_in_flight: false,
                } => {
                    st.phase = Phase::HalfOpen {
                        probe_in_flight: true,
                    };
                    st.epoch += 1;
                    Ok(PermitKind::Probe { epoch: st.epoch })
                }
            }
        };
        shared.fire(&fired);
        result.map(|kind| Permit {
            shared: Some(Arc::clone(shared)),
            kind,
        })
    }

    /// The current state. Moves Open to Half-open if the cooldown has elapsed (firing the transition hooks), so
    /// health output shows `half_open` as soon as a probe would be allowed.
    pub fn state(&self) -> BreakerState {
        let shared = &self.shared;
        let now = shared.clock.now();
        let mut fired = Fired::new();
        let phase = {
            let mut st = lock(&shared.state);
            shared.advance(&mut st, now, &mut fired);
            st.phase
        };
        shared.fire(&fired);
        phase.at(now)
    }

    /// Counters and state for `/health` and metrics (see [`BreakerSnapshot`]).
    pub fn snapshot(&self) -> BreakerSnapshot {
        let shared = &self.shared;
        let now = shared.clock.now();
        let mut fired = Fired::new();
        let snap = {
            let mut st = lock(&shared.state);
            shared.advance(&mut st, now, &mut fired);
            if st.phase == Phase::Closed {
                shared.prune(&mut st, now);
            }
            let retry_after = match st.phase {
                Phase::Closed
                | Phase::HalfOpen {
                    probe_in_flight: false,
                } => None,
                Phase::Open { until } => Some(until.saturating_duration_since(now)),
                Phase::HalfOpen {
                    probe_in_flight: true,
                } => Some(shared.probe_retry_hint()),
            };
            BreakerSnapshot {
                state: st.phase.at(now),
                recent_failures: u32::try_from(st.failures.len()).unwrap_or(u32::MAX),
                failure_threshold: shared.threshold,
                opened_count: st.opened_count,
                retry_after_secs: retry_after.map(|d| d.as_secs_f64()),
                total_failures: st.total_failures,
                total_successes: st.total_successes,
                total_rejected: st.total_rejected,
                transitions: st.transitions,
                last_transition: st.last_transition.map(|(from, to, at)| TransitionInfo {
                    from,
                    to,
                    secs_ago: now.saturating_duration_since(at).as_secs_f64(),
                }),
            }
        };
        shared.fire(&fired);
        snap
    }

    /// Registers a callback run on every transition with the old and new state names (`closed`, `open`,
    /// `half_open`), e.g. to log it or bump a metric.
    ///
    /// Callbacks run on the thread that caused the transition, after the breaker's lock is released, so they may
    /// call back into the breaker. Because of that, two transitions racing on different threads may reach the
    /// callbacks in either order; use [`BreakerSnapshot::transitions`] for an exact count.
    ///
    /// Takes a `Box` rather than a generic so that `Box::new(|from, to| ...)` infers the closure's argument types.
    pub fn on_transition(&self, f: TransitionHook) {
        lock(&self.shared.hooks).push(Arc::from(f));
    }

    /// Forces the breaker closed and forgets recorded failures; used when a tier is re-enabled or reconfigured.
    ///
    /// Counters are kept (they feed Prometheus counters, which must not go backwards). A probe permit handed out
    /// before the reset loses its special role: its outcome is then counted like any closed-state request.
    pub fn reset(&self) {
        let shared = &self.shared;
        let now = shared.clock.now();
        let mut fired = Fired::new();
        {
            let mut st = lock(&shared.state);
            st.failures.clear();
            st.epoch += 1;
            if st.phase != Phase::Closed {
                Shared::transition(&mut st, Phase::Closed, now, &mut fired);
            }
        }
        shared.fire(&fired);
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Read the phase without advancing it: Debug must not fire transition hooks.
        let phase = lock(&self.shared.state).phase;
        f.debug_struct("CircuitBreaker")
            .field("config", &self.shared.config)
            .field("state", &phase.name())
            .finish()
    }
}

impl Shared {
    fn probe_retry_hint(&self) -> Duration {
        PROBE_RETRY_HINT.min(self.cooldown)
    }

    /// Lazy Open → Half-open once the cooldown is over.
    fn advance(&self, st: &mut State, now: Instant, fired: &mut Fired) {
        if let Phase::Open { until } = st.phase
            && now >= until
        {
            Self::transition(
                st,
                Phase::HalfOpen {
                    probe_in_flight: false,
                },
                now,
                fired,
            );
        }
    }

    /// Drops failures older than the window. A failure exactly `window` old still counts (the window is closed
    /// at both ends), so "3 failures within 30 s" includes failures at 0 s, 15 s and 30 s.
    fn prune(&self, st: &mut State, now: Instant) {
        while let Some(&oldest) = st.failures.front() {
            if now.saturating_duration_since(oldest) > self.window {
                st.failures.pop_front();
            } else {
                break;
            }
        }
    }

    fn transition(st: &mut State, to: Phase, now: Instant, fired: &mut Fired) {
        let from = st.phase.name();
        st.phase = to;
        st.transitions += 1;
        st.last_transition = Some((from, to.name(), now));
        if let Phase::Open { .. } = to {
            st.opened_count += 1;
        }
        fired.push((from, to.name()));
    }

    fn open(&self, st: &mut State, now: Instant, fired: &mut Fired) {
        st.failures.clear();
        // Cooldowns are clamped to a year, so this only fails on an Instant near the end of time; staying open
        // "forever" is then the only sensible answer, and `reset` still recovers.
        let until = now.checked_add(self.cooldown).unwrap_or(now);
        Self::transition(st, Phase::Open { until }, now, fired);
    }

    fn resolve(&self, kind: PermitKind, outcome: Outcome) {
        let now = self.clock.now();
        let mut fired = Fired::new();
        {
            let mut st = lock(&self.state);
            match outcome {
                Outcome::Success => st.total_successes += 1,
                Outcome::Failure => st.total_failures += 1,
            }
            self.advance(&mut st, now, &mut fired);
            let is_current_probe = matches!(
                (kind, st.phase),
                (PermitKind::Probe { epoch }, Phase::HalfOpen { probe_in_flight: true }) if epoch == st.epoch
            );
            if is_current_probe {
                match outcome {
                    Outcome::Success => Self::transition(&mut st, Phase::Closed, now, &mut fired),
                    Outcome::Failure => self.open(&mut st, now, &mut fired),
                }
            } else if outcome == Outcome::Failure && st.phase == Phase::Closed {
                // Outcomes of requests let through while closed only matter while still closed: once the breaker
                // has tripped, the probe alone decides, and a straggler from before must not reopen or extend it.
                self.prune(&mut st, now);
                st.failures.push_back(now);
                while st.failures.len() > self.threshold as usize {
                    st.failures.pop_front();
                }
                if st.failures.len() >= self.threshold as usize {
                    self.open(&mut st, now, &mut fired);
                }
            }
        }
        self.fire(&fired);
    }

    /// An unresolved permit was dropped: free the probe slot if it held it, count nothing.
    fn release(&self, kind: PermitKind) {
        if let PermitKind::Probe { epoch } = kind {
            let mut st = lock(&self.state);
            if st.epoch == epoch
                && st.phase
                    == (Phase::HalfOpen {
                        probe_in_flight: true,
                    })
            {
                st.phase = Phase::HalfOpen {
                    probe_in_flight: false,
                };
            }
        }
    }

    fn fire(&self, fired: &Fired) {
        if fired.is_empty() {
            return;
        }
        // Clone the list so no lock is held while user code runs (it may register hooks or read the breaker).
        let hooks: Vec<Arc<Hook>> = lock(&self.hooks).clone();
        for (from, to) in fired {
            for hook in &hooks {
                hook(from, to);
            }
        }
    }
}

/// Leave to send one request, from [`CircuitBreaker::try_acquire`].
///
/// Resolve it with [`Permit::success`] or [`Permit::failure`] (or [`Permit::resolve`]). Dropping it unresolved
/// (typically because the request future was cancelled when the client went away) records nothing, since a
/// cancelled request says nothing about the backend, but does free the half-open probe slot if this permit
/// held it. The permit owns a handle to the breaker, so it is `Send + 'static` and can move into spawned tasks.
#[must_use = "a permit must be resolved with success() or failure(); dropping it records nothing"]
pub struct Permit {
    /// `None` once resolved, so that `Drop` knows not to release.
    shared: Option<Arc<Shared>>,
    kind: PermitKind,
}

impl Permit {
    /// Whether this permit is the half-open probe whose outcome closes or reopens the breaker.
    pub fn is_probe(&self) -> bool {
        matches!(self.kind, PermitKind::Probe { .. })
    }

    /// The request succeeded.
    pub fn success(self) {
        self.resolve(true);
    }

    /// The request failed in a way that should count against the backend (connection error, timeout, 5xx).
    pub fn failure(self) {
        self.resolve(false);
    }

    /// Success if `ok`, failure otherwise; convenient as `permit.resolve(result.is_ok())`.
    pub fn resolve(mut self, ok: bool) {
        if let Some(shared) = self.shared.take() {
            let outcome = if ok {
                Outcome::Success
            } else {
                Outcome::Failure
            };
            shared.resolve(self.kind, outcome);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.release(self.kind);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("probe", &self.is_probe())
            .field("resolved", &self.shared.is_none())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn setup() -> (CircuitBreaker, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new());
        let breaker = CircuitBreaker::with_clock(BreakerConfig::default(), clock.clone());
        (breaker, clock)
    }

    fn fail(b: &CircuitBreaker) {
        b.try_acquire().expect("should be let through").failure();
    }

    fn succeed(b: &CircuitBreaker) {
        b.try_acquire().expect("should be let through").success();
    }

    /// Trips the breaker with three quick failures.
    fn trip(b: &CircuitBreaker) {
        for _ in 0..3 {
            fail(b);
        }
        assert_eq!(b.state().as_str(), "open");
    }

    #[test]
    fn config_defaults_and_serde() {
        let cfg: BreakerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, BreakerConfig::default());
        assert_eq!(cfg.failure_threshold, 3);
        assert_eq!(cfg.window(), Duration::from_secs(30));
        assert_eq!(cfg.cooldown(), Duration::from_secs(30));

        let cfg: BreakerConfig = serde_json::from_str(r#"{"cooldown_secs": 5.5}"#).unwrap();
        assert_eq!(cfg.failure_threshold, 3);
        assert_eq!(cfg.cooldown(), Duration::from_millis(5500));

        let json = serde_json::to_string(&cfg).unwrap();
        let back: BreakerConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        assert!(serde_json::from_str::<BreakerConfig>(r#"{"cooldown": 5}"#).is_err());
        // Integer seconds are accepted for the float fields (TOML users write `window_secs = 30`).
        let cfg: BreakerConfig = serde_json::from_str(r#"{"window_secs": 10}"#).unwrap();
        assert_eq!(cfg.window(), Duration::from_secs(10));
    }

    #[test]
    fn config_sanitises_bad_values() {
        let cfg = BreakerConfig {
            failure_threshold: 0,
            window_secs: f64::NAN,
            cooldown_secs: -4.0,
        };
        assert_eq!(cfg.threshold(), 1);
        assert_eq!(cfg.window(), Duration::ZERO);
        assert_eq!(cfg.cooldown(), Duration::ZERO);
        let huge = BreakerConfig {
            cooldown_secs: f64::INFINITY,
            ..BreakerConfig::default()
        };
        assert_eq!(huge.cooldown(), Duration::from_secs_f64(MAX_CONFIG_SECS));
    }

    #[test]
    fn threshold_zero_opens_on_first_failure() {
        let clock = Arc::new(ManualClock::new());
        let cfg = BreakerConfig {
            failure_threshold: 0,
            ..BreakerConfig::default()
        };
        let b = CircuitBreaker::with_clock(cfg, clock);
        succeed(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b);
        assert_eq!(b.state().as_str(), "open");
    }

    #[test]
    fn opens_after_exactly_three_failures_within_window() {
        let (b, clock) = setup();
        fail(&b);
        clock.advance_secs(10.0);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().recent_failures, 2);
        clock.advance_secs(10.0);
        fail(&b);
        assert!(matches!(b.state(), BreakerState::Open { .. }));
        let snap = b.snapshot();
        assert_eq!(snap.state.as_str(), "open");
        assert_eq!(snap.opened_count, 1);
        assert_eq!(snap.total_failures, 3);
        assert_eq!(snap.recent_failures, 0, "the window is cleared on opening");
    }

    #[test]
    fn failures_spread_beyond_window_do_not_open() {
        let (b, clock) = setup();
        fail(&b); // t=0
        clock.advance_secs(16.0);
        fail(&b); // t=16
        clock.advance_secs(15.0);
        fail(&b); // t=31: the t=0 failure is 31 s old and has aged out
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.snapshot().recent_failures, 2);
        clock.advance_secs(9.0);
        fail(&b); // t=40: 16, 31, 40 are within 30 s
        assert_eq!(b.state().as_str(), "open");
    }

    #[test]
    fn failure_exactly_window_old_still_counts() {
        let (b, clock) = setup();
        fail(&b); // t=0
        clock.advance_secs(15.0);
        fail(&b); // t=15
        clock.advance_secs(15.0);
        fail(&b); // t=30: the t=0 failure is exactly 30 s old
        assert_eq!(b.state().as_str(), "open");
    }

    #[test]
    fn success_in_closed_clears_nothing() {
        let (b, clock) = setup();
        fail(&b);
        succeed(&b);
        fail(&b);
        succeed(&b);
        succeed(&b);
        clock.advance_secs(1.0);
        assert_eq!(b.snapshot().recent_failures, 2);
        fail(&b);
        assert_eq!(b.state().as_str(), "open");
        let snap = b.snapshot();
        assert_eq!(snap.total_successes, 3);
        assert_eq!(snap.total_failures, 3);
    }

    #[test]
    fn rejects_while_open_with_correct_retry_after() {
        let (b, clock) = setup();
        trip(&b);
        clock.advance_secs(10.0);
        let rej = b.try_acquire().unwrap_err();
        assert_eq!(rej.retry_after, Duration::from_secs(20));
        assert_eq!(rej.retry_after_secs_ceil(), 20);
        match b.state() {
            BreakerState::Open { remaining, .. } => assert_eq!(remaining, Duration::from_secs(20)),
            other => panic!("expected open, got {other:?}"),
        }
        assert_eq!(b.snapshot().retry_after_secs, Some(20.0));
        clock.advance_secs(19.5);
        let rej = b.try_acquire().unwrap_err();
        assert_eq!(rej.retry_after, Duration::from_millis(500));
        assert_eq!(rej.retry_after_secs_ceil(), 1);
        assert_eq!(b.snapshot().total_rejected, 2);
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through() {
        let (b, clock) = setup();
        trip(&b);
        clock.advance_secs(30.0);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen {
                probe_in_flight: false
            }
        );
        assert_eq!(b.snapshot().retry_after_secs, None);
        let probe = b.try_acquire().expect("probe");
        assert!(probe.is_probe());
        let rej = b.try_acquire().unwrap_err();
        assert_eq!(rej.retry_after, PROBE_RETRY_HINT);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen {
                probe_in_flight: true
            }
        );
        assert_eq!(b.snapshot().retry_after_secs, Some(1.0));
        probe.success();
    }

    #[test]
    fn probe_success_closes() {
        let (b, clock) = setup();
        trip(&b);
        clock.advance_secs(30.0);
        b.try_acquire().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
        let p = b.try_acquire().unwrap();
        assert!(!p.is_probe());
        p.success();
        // The old failures are gone: it takes three new ones to reopen.
        fail(&b);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b);
        assert_eq!(b.snapshot().opened_count, 2);
    }

    #[test]
    fn probe_failure_reopens_with_fresh_cooldown() {
        let (b, clock) = setup();
        trip(&b);
        clock.advance_secs(45.0); // well past the cooldown
        b.try_acquire().unwrap().failure();
        assert_eq!(b.snapshot().opened_count, 2);
        let rej = b.try_acquire().unwrap_err();
        assert_eq!(rej.retry_after, Duration::from_secs(30));
        clock.advance_secs(29.9);
        assert!(b.try_acquire().is_err());
        clock.advance_secs(0.1);
        assert!(b.try_acquire().unwrap().is_probe());
    }

    #[test]
    fn dropped_probe_releases_the_slot_without_failing() {
        let (b, clock) = setup();
        trip(&b);
        clock.advance_secs(30.0);
        let probe = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_err());
        drop(probe); // client disconnected
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen {
                probe_in_flight: false
            }
        );
        assert_eq!(b.snapshot().total_failures, 3);
        let probe = b.try_acquire().expect("the slot was freed");
        assert!(probe.is_probe());
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn dropped_permit_in_closed_counts_nothing() {
        let (b, _clock) = setup();
        for _ in 0..10 {
            drop(b.try_acquire().unwrap());
        }
        let snap = b.snapshot();
        assert_eq!(snap.state, BreakerState::Closed);
        assert_eq!(snap.total_failures + snap.total_successes, 0);
    }

    #[test]
    fn stragglers_from_closed_do_not_drive_open_or_half_open() {
        let (b, clock) = setup();
        let straggler_ok = b.try_acquire().unwrap();
        let stragglers_bad: Vec<Permit> = (0..3).map(|_| b.try_acquire().unwrap()).collect();
        trip(&b);
        // Late failures while open, even a threshold's worth, neither extend the cooldown nor count as an opening.
        clock.advance_secs(10.0);
        stragglers_bad.into_iter().for_each(Permit::failure);
        assert_eq!(
            b.try_acquire().unwrap_err().retry_after,
            Duration::from_secs(20)
        );
        clock.advance_secs(20.0);
        let probe = b.try_acquire().unwrap();
        // A late success while half-open does not close the breaker: only the probe decides.
        straggler_ok.success();
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen {
                probe_in_flight: true
            }
        );
        let snap = b.snapshot();
        assert_eq!(snap.opened_count, 1);
        assert_eq!(snap.total_failures, 6);
        assert_eq!(snap.total_successes, 1);
        probe.failure();
        assert_eq!(b.state().as_str(), "open");
    }

    #[test]
    fn transition_hook_sees_every_transition_and_may_reenter() {
        let (b, clock) = setup();
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen2 = Arc::clone(&seen);
        let b2 = b.clone();
        b.on_transition(Box::new(move |from, to| {
            // Re-entering the breaker from a hook must not deadlock.
            let _ = b2.snapshot();
            seen2.lock().unwrap().push(format!("{from}->{to}"));
        }));
        trip(&b);
        clock.advance_secs(30.0);
        b.try_acquire().unwrap().failure();
        clock.advance_secs(30.0);
        b.try_acquire().unwrap().success();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "closed->open",
                "open->half_open",
                "half_open->open",
                "open->half_open",
                "half_open->closed"
            ]
        );
        let snap = b.snapshot();
        assert_eq!(snap.transitions, 5);
        let last = snap.last_transition.unwrap();
        assert_eq!(
            (last.from, last.to, last.secs_ago),
            ("half_open", "closed", 0.0)
        );
    }

    #[test]
    fn reset_closes_keeps_counters_and_demotes_stale_probe() {
        let (b, clock) = setup();
        let hooks = Arc::new(AtomicU64::new(0));
        let h = Arc::clone(&hooks);
        b.on_transition(Box::new(move |_, _| {
            h.fetch_add(1, Ordering::SeqCst);
        }));
        trip(&b);
        clock.advance_secs(30.0);
        let probe = b.try_acquire().unwrap();
        b.reset();
        assert_eq!(b.state(), BreakerState::Closed);
        // The old probe's failure counts as one ordinary failure; it neither reopens nor breaks the state machine.
        probe.failure();
        assert_eq!(b.state(), BreakerState::Closed);
        let snap = b.snapshot();
        assert_eq!(snap.recent_failures, 1);
        assert_eq!(snap.opened_count, 1);
        assert_eq!(snap.total_failures, 4);
        assert_eq!(hooks.load(Ordering::SeqCst), 3); // closed→open, open→half_open, half_open→closed
        // Resetting a closed breaker is not a transition.
        b.reset();
        assert_eq!(b.snapshot().transitions, 3);
        assert_eq!(b.snapshot().recent_failures, 0);
    }

    #[test]
    fn state_serialises_as_plain_string() {
        let (b, clock) = setup();
        assert_eq!(serde_json::to_string(&b.state()).unwrap(), r#""closed""#);
        trip(&b);
        assert_eq!(serde_json::to_string(&b.state()).unwrap(), r#""open""#);
        clock.advance_secs(30.0);
        assert_eq!(serde_json::to_string(&b.state()).unwrap(), r#""half_open""#);
        assert_eq!(b.state().to_string(), "half_open");
        let snap = serde_json::to_value(b.snapshot()).unwrap();
        assert_eq!(snap["state"], "half_open");
        assert_eq!(snap["opened_count"], 1);
        assert_eq!(snap["retry_after_secs"], serde_json::Value::Null);
        assert_eq!(snap["last_transition"]["to"], "half_open");
    }

    #[test]
    fn zero_cooldown_goes_straight_to_half_open() {
        let clock = Arc::new(ManualClock::new());
        let cfg = BreakerConfig {
            cooldown_secs: 0.0,
            ..BreakerConfig::default()
        };
        let b = CircuitBreaker::with_clock(cfg, clock);
        for _ in 0..3 {
            fail(&b);
        }
        let probe = b.try_acquire().expect("no cooldown");
        assert!(probe.is_probe());
        let rej = b.try_acquire().unwrap_err();
        assert_eq!(rej.retry_after, Duration::ZERO);
        assert_eq!(rej.retry_after_secs_ceil(), 1);
        probe.success();
    }

    #[test]
    fn types_are_thread_safe() {
        fn assert_send_sync_static<T: Send + Sync + 'static>() {}
        assert_send_sync_static::<CircuitBreaker>();
        assert_send_sync_static::<Permit>();
        assert_send_sync_static::<Rejected>();
        assert_send_sync_static::<ManualClock>();
    }

    #[test]
    fn concurrent_half_open_admits_exactly_one_probe() {
        let (b, clock) = setup();
        trip(&b);
        clock.advance_secs(30.0);
        let threads = 16;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let b = b.clone();
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    b.try_acquire().ok()
                })
            })
            .collect();
        let permits: Vec<Permit> = handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(permits.len(), 1);
        assert!(permits[0].is_probe());
        assert_eq!(b.snapshot().total_rejected, threads as u64 - 1);
    }

    #[test]
    fn concurrency_smoke_test() {
        let cfg = BreakerConfig {
            failure_threshold: 3,
            window_secs: 0.05,
            cooldown_secs: 0.001,
        };
        let b = CircuitBreaker::new(cfg);
        let hook_calls = Arc::new(AtomicU64::new(0));
        let h = Arc::clone(&hook_calls);
        b.on_transition(Box::new(move |from, to| {
            assert_ne!(from, to);
            h.fetch_add(1, Ordering::SeqCst);
        }));
        let threads: u64 = 8;
        let per_thread: u64 = 2000;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut bad, mut rejected, mut dropped) = (0u64, 0u64, 0u64, 0u64);
                    for i in 0..per_thread {
                        match b.try_acquire() {
                            Ok(p) => match (i + t) % 4 {
                                0 => {
                                    p.failure();
                                    bad += 1;
                                }
                                1 => {
                                    drop(p);
                                    dropped += 1;
                                }
                                _ => {
                                    p.success();
                                    ok += 1;
                                }
                            },
                            Err(_) => rejected += 1,
                        }
                        if i % 100 == 0 {
                            let _ = b.snapshot();
                        }
                    }
                    (ok, bad, rejected, dropped)
                })
            })
            .collect();
        let (mut ok, mut bad, mut rejected, mut dropped) = (0, 0, 0, 0);
        for h in handles {
            let (o, f, r, d) = h.join().unwrap();
            ok += o;
            bad += f;
            rejected += r;
            dropped += d;
        }
        assert_eq!(ok + bad + rejected + dropped, threads * per_thread);
        let snap = b.snapshot();
        assert_eq!(snap.total_successes, ok);
        assert_eq!(snap.total_failures, bad);
        assert_eq!(snap.total_rejected, rejected);
        assert_eq!(snap.transitions, hook_calls.load(Ordering::SeqCst));
        // Whatever happened, the breaker can still be driven back to closed.
        b.reset();
        assert_eq!(b.state(), BreakerState::Closed);
        succeed(&b);
    }
}
