//! The memory budget shared by every engine in the process, and the OS memory-pressure signal.
//!
//! Before an engine loads a model it reserves the model's estimated footprint here (the engine's own estimate:
//! `jemma_engine::footprint` for MLX, file size plus KV cache for GGUF);
//! the reservation is refused (with a message that says what would fit) when it exceeds the configured limit
//! minus what the other engines hold, or the machine's available memory minus a headroom. A monitor thread
//! reads the OS pressure level and asks idle engines to unload when memory gets tight: macOS's
//! `kern.memorystatus_vm_pressure_level` (the level behind `DISPATCH_SOURCE_TYPE_MEMORYPRESSURE`), Linux's
//! PSI file `/proc/pressure/memory` (or a cgroup's `memory.pressure`), and available memory everywhere.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

/// `n` bytes as "x.y GiB" (or MiB below one GiB) for messages.
pub fn gib(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", n as f64 / (1u64 << 20) as f64)
    }
}

/// How tight memory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PressureLevel {
    /// Nothing to do.
    Normal,
    /// Unload engines that have been idle a while.
    Warn,
    /// Unload every idle engine now.
    Critical,
}

/// Where the pressure level comes from.
#[derive(Debug, Clone)]
pub enum PressureSource {
    /// The platform's own signal (macOS sysctl, Linux `/proc/pressure/memory`) plus available memory.
    System,
    /// A PSI-format file (`some avg10=… \n full avg10=…`), e.g. a cgroup's `memory.pressure`.
    PsiFile(PathBuf),
    /// Never under pressure.
    Off,
}

/// Settings of the governor.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Most bytes all models together may take (None: only the machine's memory limits them).
    pub limit_bytes: Option<u64>,
    /// Memory to leave free for the rest of the machine when loading.
    pub headroom_bytes: u64,
    /// Pressure signal.
    pub pressure: PressureSource,
    /// How often the pressure is read.
    pub poll: Duration,
    /// At `Warn`, engines idle at least this long are unloaded.
    pub warn_idle: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            limit_bytes: None,
            headroom_bytes: 1 << 30,
            pressure: PressureSource::System,
            poll: Duration::from_secs(2),
            warn_idle: Duration::from_secs(30),
        }
    }
}

/// A model does not fit.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct InsufficientMemory(pub String);

struct Slot {
    name: String,
    reserved: u64,
    /// Set by the governor; the engine thread unloads at its next idle check.
    unload: Arc<AtomicBool>,
    /// Milliseconds since the governor's epoch when the engine became idle; 0 while busy or unloaded.
    idle_since_ms: Arc<AtomicU64>,
}

/// The process-wide memory budget (cheap to clone via `Arc`).
pub struct MemoryGovernor {
    config: MemoryConfig,
    available: Box<dyn Fn() -> u64 + Send + Sync>,
    slots: Mutex<BTreeMap<u64, Slot>>,
    next: AtomicU64,
    epoch: Instant,
    level: Mutex<PressureLevel>,
}

/// An engine's registration: its reservation and the flags the governor sets.
pub struct EngineHandle {
    governor: Arc<MemoryGovernor>,
    id: u64,
    unload: Arc<AtomicBool>,
    idle_since_ms: Arc<AtomicU64>,
}

/// A snapshot for `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryStatus {
    /// Configured limit.
    pub limit_bytes: Option<u64>,
    /// Reserved by loaded engines.
    pub reserved_bytes: u64,
    /// Available on the machine now.
    pub available_bytes: u64,
    /// Current pressure.
    pub pressure: PressureLevel,
}

/// Available memory of the machine (sysinfo; on macOS free + inactive + purgeable pages).
pub fn system_available_bytes() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.available_memory()
}

impl std::fmt::Debug for MemoryGovernor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryGovernor")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl MemoryGovernor {
    /// A governor reading the machine's available memory.
    pub fn new(config: MemoryConfig) -> Arc<Self> {
        Self::with_available(config, Box::new(system_available_bytes))
    }

    /// A governor with an injected available-memory reading (tests).
    pub fn with_available(
        config: MemoryConfig,
        available: Box<dyn Fn() -> u64 + Send + Sync>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            available,
            slots: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(1),
            epoch: Instant::now(),
            level: Mutex::new(PressureLevel::Normal),
        })
    }

    /// Starts the pressure monitor thread (it ends when the governor is dropped).
    pub fn start_monitor(self: &Arc<Self>) {
        if matches!(self.config.pressure, PressureSource::Off) {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        let poll = self.config.poll;
        let _ = std::thread::Builder::new()
            .name("jemma-memory".into())
            .spawn(move || {
                while let Some(g) = weak.upgrade() {
                    let level = g.read_pressure();
                    g.on_pressure(level);
                    drop(g);
                    std::thread::sleep(poll);
                }
            });
    }

    /// Registers an engine (no memory reserved yet).
    pub fn register(self: &Arc<Self>, name: &str) -> EngineHandle {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let unload = Arc::new(AtomicBool::new(false));
        let idle_since_ms = Arc::new(AtomicU64::new(0));
        self.lock().insert(
            id,
            Slot {
                name: name.to_string(),
                reserved: 0,
                unload: unload.clone(),
                idle_since_ms: idle_since_ms.clone(),
            },
        );
        EngineHandle {
            governor: self.clone(),
            id,
            unload,
            idle_since_ms,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current figures.
    pub fn status(&self) -> MemoryStatus {
        MemoryStatus {
            limit_bytes: self.config.limit_bytes,
            reserved_bytes: self.lock().values().map(|s| s.reserved).sum(),
            available_bytes: (self.available)(),
            pressure: *self.level.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Reads the configured pressure source now.
    pub fn read_pressure(&self) -> PressureLevel {
        let psi = match &self.config.pressure {
            PressureSource::Off => return PressureLevel::Normal,
            PressureSource::PsiFile(p) => std::fs::read_to_string(p)
                .ok()
                .map(|s| parse_psi(&s))
                .unwrap_or(PressureLevel::Normal),
            PressureSource::System => system_pressure(),
        };
        // Below the headroom the machine is about to swap, whatever the kernel's averages say yet.
        let low = if matches!(self.config.pressure, PressureSource::System)
            && (self.available)() < self.config.headroom_bytes / 2
        {
            PressureLevel::Critical
        } else {
            PressureLevel::Normal
        };
        psi.max(low)
    }

    /// Acts on a pressure level: flags idle engines to unload (Critical: all; Warn: idle for `warn_idle`).
    pub fn on_pressure(&self, level: PressureLevel) {
        let prev = std::mem::replace(
            &mut *self.level.lock().unwrap_or_else(|e| e.into_inner()),
            level,
        );
        if level != prev {
            tracing::info!(?level, "memory pressure changed");
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        for s in self.lock().values() {
            let idle = s.idle_since_ms.load(Ordering::Relaxed);
            if s.reserved == 0 || idle == 0 {
                continue;
            }
            let idle_for = Duration::from_millis(now.saturating_sub(idle));
            let go = match level {
                PressureLevel::Critical => true,
                PressureLevel::Warn => idle_for >= self.config.warn_idle,
                PressureLevel::Normal => false,
            };
            if go && !s.unload.swap(true, Ordering::Relaxed) {
                tracing::warn!(engine = %s.name, ?level, "memory pressure: unloading an idle model");
            }
        }
    }
}

impl EngineHandle {
    /// Reserves `bytes` for this engine's model, replacing its previous reservation; refused when it does
    /// not fit the limit or the machine's available memory.
    pub fn reserve(&self, bytes: u64, what: &str) -> Result<(), InsufficientMemory> {
        let g = &self.governor;
        let mut slots = g.lock();
        let others: u64 = slots
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(_, s)| s.reserved)
            .sum();
        let mine = slots.get(&self.id).map(|s| s.reserved).unwrap_or(0);
        if let Some(limit) = g.config.limit_bytes
            && others + bytes > limit
        {
            return Err(InsufficientMemory(format!(
                "{what} needs {} but the memory limit is {} and other models hold {}: lower the tier's \
                 context_length, pick a smaller model, or raise [memory] limit",
                gib(bytes),
                gib(limit),
                gib(others)
            )));
        }
        // What this engine already holds is resident and counted as used by the OS.
        let free = (g.available)().saturating_add(mine);
        let usable = free.saturating_sub(g.config.headroom_bytes);
        if bytes > usable {
            return Err(InsufficientMemory(format!(
                "{what} needs {} but only {} is available ({} free, {} kept for the rest of the system): \
                 close other apps, unload another tier, lower context_length, or pick a smaller model",
                gib(bytes),
                gib(usable),
                gib(free),
                gib(g.config.headroom_bytes)
            )));
        }
        if let Some(s) = slots.get_mut(&self.id) {
            s.reserved = bytes;
        }
        Ok(())
    }

    /// Gives the reservation back (after unloading).
    pub fn release(&self) {
        if let Some(s) = self.governor.lock().get_mut(&self.id) {
            s.reserved = 0;
        }
        self.unload.store(false, Ordering::Relaxed);
        self.idle_since_ms.store(0, Ordering::Relaxed);
    }

    /// Marks the engine idle (from now) or busy.
    pub fn set_idle(&self, idle: bool) {
        let v = if idle {
            (self.governor.epoch.elapsed().as_millis() as u64).max(1)
        } else {
            0
        };
        self.idle_since_ms.store(v, Ordering::Relaxed);
    }

    /// Whether the governor asked this engine to unload.
    pub fn unload_requested(&self) -> bool {
        self.unload.load(Ordering::Relaxed)
    }

    /// The governor.
    pub fn governor(&self) -> &Arc<MemoryGovernor> {
        &self.governor
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.governor.lock().remove(&self.id);
    }
}

/// Parses PSI text: `full avg10` ≥ 5 % or `some avg10` ≥ 40 % is critical, `some avg10` ≥ 10 % a warning.
pub fn parse_psi(s: &str) -> PressureLevel {
    let avg10 = |kind: &str| {
        s.lines()
            .find(|l| l.starts_with(kind))
            .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("avg10=")))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (some, full) = (avg10("some"), avg10("full"));
    if full >= 5.0 || some >= 40.0 {
        PressureLevel::Critical
    } else if some >= 10.0 {
        PressureLevel::Warn
    } else {
        PressureLevel::Normal
    }
}

#[cfg(target_os = "macos")]
fn system_pressure() -> PressureLevel {
    // 1 normal, 2 warn, 4 critical: the kernel's level that dispatch's memory-pressure source reports.
    let mut level: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>();
    let name = c"kern.memorystatus_vm_pressure_level";
    // SAFETY: name is NUL-terminated; level/len describe a c_int buffer; no new value is written.
    let rc = unsafe {
        libc::sysctlbyname(
            name.as_ptr(),
            (&mut level as *mut libc::c_int).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    match (rc, level) {
        (0, 4) => PressureLevel::Critical,
        (0, 2) => PressureLevel::Warn,
        _ => PressureLevel::Normal,
    }
}

#[cfg(not(target_os = "macos"))]
fn system_pressure() -> PressureLevel {
    std::fs::read_to_string("/proc/pressure/memory")
        .map(|s| parse_psi(&s))
        .unwrap_or(PressureLevel::Normal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn governor(limit: Option<u64>, avail: Arc<AtomicU64>) -> Arc<MemoryGovernor> {
        MemoryGovernor::with_available(
            MemoryConfig {
                limit_bytes: limit,
                headroom_bytes: 100,
                pressure: PressureSource::Off,
                poll: Duration::from_millis(10),
                warn_idle: Duration::from_millis(50),
            },
            Box::new(move || avail.load(Ordering::Relaxed)),
        )
    }

    #[test]
    fn psi_levels() {
        let calm = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi(calm), PressureLevel::Normal);
        assert_eq!(
            parse_psi(
                "some avg10=12.50 avg60=1 avg300=0 total=5\nfull avg10=1.00 avg60=0 avg300=0 total=1"
            ),
            PressureLevel::Warn
        );
        assert_eq!(
            parse_psi(
                "some avg10=20.00 avg60=1 avg300=0 total=5\nfull avg10=7.10 avg60=0 avg300=0 total=1"
            ),
            PressureLevel::Critical
        );
        assert_eq!(parse_psi("garbage"), PressureLevel::Normal);
    }

    #[test]
    fn limit_counts_other_engines() {
        let avail = Arc::new(AtomicU64::new(1 << 40));
        let g = governor(Some(1000), avail);
        let a = g.register("a");
        let b = g.register("b");
        a.reserve(600, "model a").unwrap();
        let err = b.reserve(500, "model b").unwrap_err().to_string();
        assert!(err.contains("memory limit"), "{err}");
        b.reserve(400, "model b").unwrap();
        // Re-reserving replaces the engine's own reservation instead of adding to it.
        a.reserve(600, "model a").unwrap();
        a.release();
        b.reserve(900, "model b").unwrap();
        assert_eq!(g.status().reserved_bytes, 900);
        drop(b);
        assert_eq!(g.status().reserved_bytes, 0);
    }

    #[test]
    fn available_memory_and_headroom() {
        let avail = Arc::new(AtomicU64::new(1000));
        let g = governor(None, avail.clone());
        let a = g.register("a");
        assert!(a.reserve(950, "big").unwrap_err().0.contains("available"));
        a.reserve(900, "fits").unwrap();
        // Once resident the model counts as used memory; re-checking must not count it twice.
        avail.store(100, Ordering::Relaxed);
        a.reserve(900, "fits").unwrap();
    }

    #[test]
    fn pressure_flags_idle_engines() {
        let avail = Arc::new(AtomicU64::new(1 << 40));
        let g = governor(None, avail);
        let busy = g.register("busy");
        let idle = g.register("idle");
        let fresh = g.register("fresh");
        for h in [&busy, &idle, &fresh] {
            h.reserve(10, "m").unwrap();
        }
        busy.set_idle(false);
        idle.set_idle(true);
        std::thread::sleep(Duration::from_millis(60));
        fresh.set_idle(true);
        g.on_pressure(PressureLevel::Warn);
        assert!(idle.unload_requested(), "idle past warn_idle");
        assert!(!fresh.unload_requested(), "only just idle");
        assert!(!busy.unload_requested(), "never a busy engine");
        g.on_pressure(PressureLevel::Critical);
        assert!(fresh.unload_requested());
        assert!(!busy.unload_requested());
        assert_eq!(g.status().pressure, PressureLevel::Critical);
    }
}
