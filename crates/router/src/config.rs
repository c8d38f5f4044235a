//! `jemma.toml`: server, limits, classifier, breaker and tier settings. Every key has a default, so an empty
//! file is valid; `JEMMA_*` environment variables override the file (see [`Config::apply_env`]).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::RouterError;
use crate::api::Limits;
use crate::breaker::BreakerConfig;
use crate::classify::{ClassifierConfig, Tier};
use crate::dialect::Dialect;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listening address and timeouts.
    pub server: ServerConfig,
    /// Request limits.
    pub limits: Limits,
    /// Routing heuristics.
    pub classifier: ClassifierConfig,
    /// Circuit breaker defaults for every tier.
    pub breaker: BreakerConfig,
    /// Tiers by name (`fast`, `primary`, `heavy`).
    pub tiers: BTreeMap<Tier, TierConfig>,
    /// Who may call the gateway.
    pub auth: AuthConfig,
    /// Per-caller request budgets.
    pub rate_limits: RateLimitConfig,
    /// How much memory local models may take, and when to unload them.
    pub memory: MemorySettings,
    /// Where local models come from (catalog, Hugging Face downloads).
    pub models: ModelsSettings,
    /// Other Jemma nodes on the tailnet.
    pub peers: PeersSettings,
}

/// `[peers]`: finding other Jemma nodes on the tailnet and calling them (the app's Peers menu).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeersSettings {
    /// The port other nodes' gateways listen on (default 8080).
    pub port: u16,
    /// Seconds each machine has to answer the `/health` handshake (default 2).
    pub timeout_secs: f64,
    /// Bearer key sent to a peer that joins a pool from the tray: a literal, `env:VAR` or
    /// `keyring:SERVICE/ACCOUNT` (the app's default: its keychain's `peer_api_key`, when set). A peer that
    /// requires keys refuses calls without it.
    pub api_key: Option<String>,
}

impl Default for PeersSettings {
    fn default() -> Self {
        Self {
            port: 8080,
            timeout_secs: 2.0,
            api_key: None,
        }
    }
}

/// A byte count: an integer, or a string with a unit (`"12GiB"`, `"512 MiB"`, `"8GB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_bytes(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `"12GiB"`, `"512 MiB"`, `"8GB"`, `"1024"`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. \"12GiB\")"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1048576.0,
        "g" | "gib" => 1073741824.0,
        "t" | "tib" => 1099511627776.0,
        u => return Err(format!("unknown size unit {u:?} in {s:?}")),
    };
    Ok((n * mult) as u64)
}

/// `[memory]`: the budget local models share and the pressure response.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemorySettings {
    /// Most memory all local models together may take (None: the machine's available memory decides).
    pub limit: Option<ByteSize>,
    /// Memory left for the rest of the machine when loading a model.
    pub headroom: ByteSize,
    /// Pressure signal: `"system"` (macOS memory-pressure level, Linux `/proc/pressure/memory`), `"off"`,
    /// or the path of a PSI file (a cgroup's `memory.pressure`).
    pub pressure: String,
    /// Seconds between pressure readings.
    pub poll_secs: f64,
    /// Under a pressure warning, unload models idle at least this long (critical: every idle model).
    pub warn_idle_secs: f64,
}

impl Default for MemorySettings {
    fn default() -> Self {
        Self {
            limit: None,
            headroom: ByteSize(1 << 30),
            pressure: "system".into(),
            poll_secs: 2.0,
            warn_idle_secs: 30.0,
        }
    }
}

/// `[models]`: the catalog and downloads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsSettings {
    /// A user catalog adding to or overriding the built-in one (default `~/.config/jemma/models.toml`).
    pub catalog: Option<String>,
    /// Download a tier's model at start when it is a catalog name or Hub repo not in the cache yet.
    pub auto_download: bool,
    /// Hugging Face cache directory (default: `$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`).
    pub cache_dir: Option<String>,
    /// Hub URL (default: `$HF_ENDPOINT`, else huggingface.co).
    pub endpoint: Option<String>,
    /// Token for gated repos: a literal, `env:VAR` or `keyring:SERVICE/ACCOUNT` (default: `HF_TOKEN`, the
    /// app's keychain entry, then the HF CLI's token file).
    pub token: Option<String>,
}

impl Default for ModelsSettings {
    fn default() -> Self {
        Self {
            catalog: None,
            auto_download: true,
            cache_dir: None,
            endpoint: None,
            token: None,
        }
    }
}

/// `[auth]`: API keys for everyone who is not a loopback caller.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Local processes need no key (like Ollama). Requests proxied by `tailscale serve` are never exempt.
    pub exempt_loopback: bool,
    /// Key file (hashed keys; `jemma keys create` writes it). Default: `$JEMMA_KEYS_FILE` or
    /// `~/.config/jemma/keys.json`.
    pub keys_file: Option<String>,
    /// Further accepted keys as references (`env:HEAVY_API_KEY`, or a literal): the heavy tier's Cloud Run
    /// service takes its bearer key from Secret Manager this way. Unresolvable references fail the start.
    pub keys: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            exempt_loopback: true,
            keys_file: None,
            keys: vec![],
        }
    }
}

/// `[rate_limits]`: per key (or IP) budgets, by default the original design's 30 text and 10 media
/// requests a minute.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Text requests per minute per caller (0 = unlimited).
    pub text_per_minute: u32,
    /// Requests with images, audio or video per minute per caller (0 = unlimited).
    pub media_per_minute: u32,
    /// Also limit loopback callers.
    pub limit_loopback: bool,
    /// Text requests per caller per UTC day (0 = off; the original design used 100).
    pub daily_text: u32,
    /// Media requests per caller per UTC day (0 = off; the original design used 20).
    pub daily_media: u32,
    /// Where daily counts persist (default: next to the key file, `quotas.json`).
    pub quota_file: Option<String>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            text_per_minute: 30,
            media_per_minute: 10,
            limit_loopback: false,
            daily_text: 0,
            daily_media: 0,
            quota_file: None,
        }
    }
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Bind address (loopback by default: exposure is an explicit choice).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Largest request body in bytes (413 above).
    pub max_body_bytes: usize,
    /// Seconds between SSE comments sent while a stream waits for a tier, so proxies keep it open
    /// (`sse_keep_alive_secs`; the old name `keep_alive_secs` is still read, but it was also a tier's
    /// model-unload setting).
    #[serde(alias = "keep_alive_secs")]
    pub sse_keep_alive_secs: f64,
    /// Browser origins allowed to call the API (CORS): the app's own webview by default. Other local apps
    /// are not browsers and need no CORS.
    pub cors_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            max_body_bytes: 32 << 20,
            sse_keep_alive_secs: 10.0,
            cors_origins: vec!["tauri://localhost".into(), "http://tauri.localhost".into()],
        }
    }
}

/// The engine behind a tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TierKind {
    /// An in-process engine: MLX for a model directory, llama.cpp for a `.gguf` file.
    #[default]
    Local,
    /// OpenAI-compatible HTTP upstream.
    Openai,
}

/// llama.cpp's flash attention policy on a GGUF tier (llama-server's `--flash-attn on|off|auto`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlashAttention {
    /// llama.cpp decides (on where its backend runs it, CPUs included).
    #[default]
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

/// The element type of llama.cpp's K or V cache on a GGUF tier: the values llama-server's
/// `--cache-type-k`/`--cache-type-v` take (`kv_cache_types` in llama.cpp's common/arg.cpp), by ggml's type
/// names.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats (llama.cpp's default).
    #[default]
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit blocks of 32 with one scale (34 bytes per 32 values).
    Q8_0,
    /// 4-bit blocks of 32 with one scale (18 bytes per 32).
    Q4_0,
    /// 4-bit blocks of 32 with a scale and a minimum (20 bytes per 32).
    Q4_1,
    /// 4-bit non-linear blocks of 32 (18 bytes per 32).
    Iq4_nl,
    /// 5-bit blocks of 32 with one scale (22 bytes per 32).
    Q5_0,
    /// 5-bit blocks of 32 with a scale and a minimum (24 bytes per 32).
    Q5_1,
}

impl CacheType {
    /// Every type, in llama-server's order.
    pub const ALL: [CacheType; 9] = [
        Self::F32,
        Self::F16,
        Self::Bf16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4_1,
        Self::Iq4_nl,
        Self::Q5_0,
        Self::Q5_1,
    ];

    /// ggml's name of the type, as the TOML writes it (`q8_0`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Iq4_nl => "iq4_nl",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
        }
    }

    /// Whether the type is block-quantized (not a float type): llama.cpp then reads a V cache of it only
    /// with flash attention.
    pub fn is_quantized(self) -> bool {
        !matches!(self, Self::F32 | Self::F16 | Self::Bf16)
    }
}

impl std::str::FromStr for CacheType {
    type Err = String;

    /// A type by ggml's name (`q8_0`), as llama-server's `--cache-type-k` reads it. Errors: another
    /// name, with the names there are.
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
                format!("unknown KV cache type {s:?}: one of {}", names.join(", "))
            })
    }
}

/// `[tiers.NAME]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TierConfig {
    /// `local` or `openai`.
    pub kind: TierKind,
    /// Local: a model directory, a catalog name (`gemma-4-e2b`) or a Hugging Face repo
    /// (`mlx-community/gemma-4-E2B-it-4bit`). OpenAI: model name sent upstream.
    pub model: String,
    /// OpenAI: base URL.
    pub url: Option<String>,
    /// OpenAI: bearer key: a literal, `env:VAR`, or `keyring:SERVICE/ACCOUNT` (resolved by the host app).
    pub api_key: Option<String>,
    /// OpenAI: what the upstream calls `top_k`, `min_p`, `repetition_penalty` and the thinking fields
    /// (`auto`, `vllm`, `llama-server`, `openai`; see [`crate::dialect`]). Default `auto`: learned from its
    /// `/v1/models`.
    pub dialect: Dialect,
    /// Whether the tier takes requests (the heavy toggle).
    pub enabled: bool,
    /// Requests running at once on this tier; for a local tier also the engine's batch (sequences decoded
    /// together, each with the whole `context_length` of KV cache reserved). None: see
    /// [`TierConfig::concurrency`].
    pub max_concurrency: Option<usize>,
    /// Requests waiting for a slot before the tier reports busy (429 / fallback).
    pub max_queue: usize,
    /// Longest silence before the answer first moves, counted once the tier has taken the request (the
    /// wait for a place in its queue, `max_queue`, is not counted): until an upstream's first token, or a
    /// local engine's first step (loading the model and waiting for a place in its batch count; the first
    /// chunk of a long prompt read is a step). Each chunk before then (such as a stream's opening one)
    /// starts it over; a pool counts it from each endpoint try's start. Long for a cold cloud tier.
    pub first_token_timeout_secs: f64,
    /// Longest silence once the answer moves: between two tokens, two chunks of a prompt read, or two
    /// tokens of a tool call being written (the call reaches the client whole when it closes;
    /// [`crate::backend::Chunk::Progress`]). So a long prompt read in chunks is held to this, not to
    /// `first_token_timeout_secs`, after its first chunk.
    pub idle_timeout_secs: f64,
    /// `max_tokens` when the client sets none (None: `[limits] default_max_tokens`); lowered to the room
    /// the prompt leaves in the context.
    pub default_max_tokens: Option<u32>,
    /// Model ids that select this tier, besides its name.
    pub aliases: Vec<String>,
    /// Per-tier breaker settings (default: `[breaker]`).
    pub breaker: Option<BreakerConfig>,
    /// Largest max_tokens this tier accepts (None: only `[limits] max_tokens_ceiling`).
    pub max_tokens_ceiling: Option<u32>,
    /// Local: release the model after this many idle seconds and reload it on the next request (Ollama's
    /// keep-alive; -1 = never).
    pub keep_alive_secs: i64,
    /// Local, MLX: quantize the full-attention KV caches to this many bits (MLX's quantized widths: 2, 3,
    /// 4, 5, 6 or 8; mlx-lm's `kv_bits`; None = full precision). Speculates only with a named draft model
    /// (the assistant drafter reads the cache in full precision).
    pub kv_bits: Option<i32>,
    /// Local, MLX: elements per KV quantization group (default 64; must divide the head dimensions).
    pub kv_group_size: i32,
    /// Local, MLX: positions a cache holds before it is quantized (mlx-lm's `quantized_kv_start`).
    pub quantized_kv_start: usize,
    /// Local: longest context served (prompt + answer); also what the memory estimate is made for
    /// (None: the model's maximum).
    pub context_length: Option<usize>,
    /// Local: load the model at start (true) or at the first request (false).
    pub preload: bool,
    /// `[[tiers.NAME.endpoints]]`: the tier is a pool of these endpoints, balanced by least outstanding
    /// requests with conversation affinity (see [`crate::pool`]). Empty: the tier is one backend, as
    /// `kind`, `model` and `url` say (a pool of one).
    pub endpoints: Vec<EndpointConfig>,
    /// Pools: seconds between active health probes of each endpoint.
    pub probe_interval_secs: f64,
    /// Pools: consecutive failed probes that take an endpoint out (a request refused by it takes it out
    /// at once).
    pub unhealthy_threshold: u32,
    /// Pools: consecutive answered probes that bring an endpoint back.
    pub healthy_threshold: u32,
    /// Frames a video is sampled into on this tier (default: fast 4, primary 8, heavy 16).
    pub video_frames: Option<usize>,
    /// Seconds from a video's start its frames are spread over (default: fast 30, primary 60, heavy 120).
    pub video_seconds: Option<f64>,
    /// Local, GGUF: the model's multimodal projector, llama.cpp's mmproj GGUF (its vision and audio
    /// towers; llama-server's `--mmproj`), a path. None: for a catalog model, the mmproj the catalog
    /// pairs with it once downloaded (`jemma pull` fetches it); else the one `mmproj*.gguf` beside the
    /// model when the model's folder holds just the two; else the tier serves text only.
    pub mmproj: Option<std::path::PathBuf>,
    /// Local, GGUF: soft tokens an image takes at most (Gemma 4's processor's `max_soft_tokens`, 280 by
    /// default; a quarter at `detail: "low"`). Refused on an MLX tier, which reads its own from the
    /// checkpoint (as `mmproj` is).
    pub image_tokens: Option<usize>,
    /// Local, GGUF: soft tokens a video frame takes at most (Gemma 4's video processor's
    /// `max_soft_tokens`, 70 by default, never more than `image_tokens`). Refused on an MLX tier, which
    /// reads its own from the checkpoint.
    pub video_tokens: Option<usize>,
    /// Local, GGUF: llama.cpp's flash attention, `auto` (llama.cpp decides; the default), `on` or `off`
    /// (llama-server's `--flash-attn`). On a CPU, `off` makes a request decoded beside others answer to the
    /// bit as it does alone, for weights whose kernels do not depend on the batch (on x86-64: Q8_0, Q4_1,
    /// Q5_0, Q5_1), at 1-12 % of speed (docs/BENCHMARKS.md, "Batch invariance"). Refused on MLX and openai
    /// tiers.
    pub flash_attention: Option<FlashAttention>,
    /// Local, GGUF: the element type of llama.cpp's K cache (llama-server's `--cache-type-k`): `f16` (the
    /// default), `f32`, `bf16`, `q8_0`, `q4_0`, `q4_1`, `iq4_nl`, `q5_0` or `q5_1`. A quantized cache
    /// holds more context, or more sequences, in the same memory (`q8_0`: 34 bytes per 32 values against
    /// 64) at some precision; the memory estimate counts it. Refused on MLX tiers (whose KV cache is
    /// quantized by `kv_bits`) and openai tiers.
    pub cache_type_k: Option<CacheType>,
    /// Local, GGUF: the element type of llama.cpp's V cache (llama-server's `--cache-type-v`), as
    /// `cache_type_k`. llama.cpp reads a quantized V cache only with flash attention, so a quantized type
    /// is refused with `flash_attention = "off"`.
    pub cache_type_v: Option<CacheType>,
    /// `[tiers.NAME.speculative]`: speculative decoding with a draft model (local tiers, either engine).
    /// Without this section an MLX tier speculates with the assistant drafter found next to its model,
    /// if one is (see [`SpeculativeTierConfig::draft_model`]).
    pub speculative: Option<SpeculativeTierConfig>,
}

/// `[tiers.NAME.speculative]`: speculative decoding with a draft model on a local tier (MLX or llama.cpp;
/// the draft runs on the tier model's engine). The draft
/// proposes tokens that the tier's model verifies several at a time; the answer is the tier's model's own
/// (greedy: token for token up to rounding; sampling: the same distribution).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SpeculativeTierConfig {
    /// The draft model, named as a tier's `model` is (a path, catalog name, Hub repo or URL; downloaded
    /// with the model when missing): a smaller Gemma with the same tokenizer (E2B for E4B) — MLX for an
    /// MLX tier, a `.gguf` for a GGUF tier — or, on MLX, the tier model's Gemma 4 assistant (MTP) drafter
    /// (a `gemma4_assistant` checkpoint). Empty (the default): the assistant drafter found next to the
    /// model, for MLX models — the one the catalog pairs it with (`jemma pull` fetches it), or a
    /// directory beside it named `<model up to "-it">-it-assistant…`; none found, no speculation.
    pub draft_model: String,
    /// Whether to speculate (false keeps the settings and turns it off).
    pub enabled: bool,
    /// Most tokens drafted per verification (1 to 16; vLLM's `num_speculative_tokens`).
    pub max_draft_tokens: usize,
    /// Speculation pauses while more than this many requests decode together (1: single streams;
    /// above 1 the requests that speculate together are verified in one forward pass).
    pub max_batch: usize,
    /// Follow the acceptance rate: fewer drafts, or none, when few are accepted (false: always
    /// `max_draft_tokens`).
    pub adaptive: bool,
}

impl Default for SpeculativeTierConfig {
    fn default() -> Self {
        // jemma_serve::speculative::SpeculativeConfig's defaults (the router builds without the engines).
        Self {
            draft_model: String::new(),
            enabled: true,
            max_draft_tokens: 4,
            max_batch: 1,
            adaptive: true,
        }
    }
}

/// What serves one endpoint of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    /// This node's in-process engine, serving the tier's `model` with the tier's local settings.
    Local,
    /// Another Jemma node: `model` is the peer's tier (default: this tier's name); probed on `/health`,
    /// which must show that tier serving.
    Jemma,
    /// Any OpenAI-compatible server (vLLM, exo, llama-server, another gateway); probed on `/v1/models`.
    Openai,
}

/// `[[tiers.NAME.endpoints]]`: one member of a tier's pool.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// `local`, `jemma` or `openai` (default: `openai` when `url` is set, else `local`).
    pub kind: Option<EndpointKind>,
    /// Label in `/health`, `/metrics` and `_routing.endpoint` (default: the URL's host:port, or `local`).
    pub name: Option<String>,
    /// Base URL (with or without `/v1`); required except for `local`.
    pub url: Option<String>,
    /// Bearer key: a literal, `env:VAR`, or `keyring:SERVICE/ACCOUNT`.
    #[serde(alias = "key")]
    pub api_key: Option<String>,
    /// Model name sent to the endpoint (default: the tier's `model` for `openai`, the tier's name for
    /// `jemma`).
    pub model: Option<String>,
    /// `openai`: what the server calls the fields OpenAI's API lacks ([`crate::dialect`]; default `auto`,
    /// learned from its `/v1/models`). A Jemma node speaks Jemma's own (vLLM's).
    #[serde(default)]
    pub dialect: Dialect,
    /// Share of the load relative to the other endpoints (default 1).
    #[serde(default = "one")]
    pub weight: f64,
    /// Requests sent to this endpoint at once (default: 4 for `local` and `jemma`, 1 for `openai`).
    pub max_concurrency: Option<usize>,
    /// Whether the pool probes it actively (default true). A service that scales to zero (Cloud Run)
    /// would be kept awake, and billed, by probes: with `probe = false` only its answers judge it (its
    /// breaker, a refused connection, Retry-After).
    #[serde(default = "yes")]
    pub probe: bool,
}

fn yes() -> bool {
    true
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            kind: None,
            name: None,
            url: None,
            api_key: None,
            model: None,
            dialect: Dialect::Auto,
            weight: 1.0,
            max_concurrency: None,
            probe: true,
        }
    }
}

fn one() -> f64 {
    1.0
}

impl EndpointConfig {
    /// The endpoint's kind, defaulted from whether it has a URL.
    pub fn kind(&self) -> EndpointKind {
        self.kind.unwrap_or(if self.url.is_some() {
            EndpointKind::Openai
        } else {
            EndpointKind::Local
        })
    }

    /// Requests at once: `max_concurrency`, else 4 for `local` and `jemma` (a Jemma node's default
    /// batch) and 1 for `openai` (as an OpenAI tier).
    pub fn concurrency(&self) -> usize {
        self.max_concurrency.unwrap_or(match self.kind() {
            EndpointKind::Openai => 1,
            _ => 4,
        })
    }

    /// The label shown for it: `name`, else the URL's `host:port`, else `local`.
    pub fn label(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        match &self.url {
            Some(u) => {
                let rest = u.split("://").nth(1).unwrap_or(u);
                rest.split('/').next().unwrap_or(rest).to_string()
            }
            None => "local".into(),
        }
    }
}

impl TierConfig {
    /// Adds `endpoint` to this tier's pool; a tier that is one backend becomes a pool of it and the
    /// newcomer first (its local engine, or its upstream, unprobed as it was before: a Cloud Run
    /// service must not be kept awake). What the tier set on its one backend (url, key,
    /// max_concurrency) moves onto that first endpoint, as [`Config::check`] wants of a pool.
    pub fn join(&mut self, endpoint: EndpointConfig) {
        if self.endpoints.is_empty() {
            let own = match self.kind {
                TierKind::Local => EndpointConfig {
                    kind: Some(EndpointKind::Local),
                    max_concurrency: self.max_concurrency.take(),
                    ..EndpointConfig::default()
                },
                TierKind::Openai => EndpointConfig {
                    kind: Some(EndpointKind::Openai),
                    url: self.url.take(),
                    api_key: self.api_key.take(),
                    model: Some(self.model.clone()).filter(|m| !m.is_empty()),
                    max_concurrency: Some(self.max_concurrency.take().unwrap_or(1)),
                    probe: false,
                    ..EndpointConfig::default()
                },
            };
            self.kind = TierKind::Local;
            self.endpoints.push(own);
        }
        self.endpoints.push(endpoint);
    }

    /// Requests run at once: `max_concurrency` when set, else 4 for a local tier (both engines decode the
    /// running requests together, and a decode step reads every weight once whatever the batch, so 4
    /// sequences cost little more than one while the KV cache reserved grows with each: llama-server's
    /// default is 4 slots too) and 1 for an upstream (its own server decides how many it runs).
    pub fn concurrency(&self) -> usize {
        if !self.endpoints.is_empty() {
            // A pool runs what its endpoints run together.
            return self.endpoints.iter().map(EndpointConfig::concurrency).sum();
        }
        if let Some(n) = self.max_concurrency {
            return n;
        }
        if self.kind == TierKind::Local { 4 } else { 1 }
    }
}

impl Default for TierConfig {
    fn default() -> Self {
        Self {
            kind: TierKind::Local,
            model: String::new(),
            url: None,
            api_key: None,
            dialect: Dialect::Auto,
            enabled: true,
            max_concurrency: None,
            max_queue: 16,
            first_token_timeout_secs: 120.0,
            idle_timeout_secs: 60.0,
            default_max_tokens: None,
            aliases: vec![],
            breaker: None,
            max_tokens_ceiling: None,
            keep_alive_secs: 300,
            kv_bits: None,
            kv_group_size: 64,
            quantized_kv_start: 5000,
            context_length: None,
            preload: true,
            endpoints: vec![],
            probe_interval_secs: 5.0,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
            video_frames: None,
            video_seconds: None,
            mmproj: None,
            image_tokens: None,
            video_tokens: None,
            flash_attention: None,
            cache_type_k: None,
            cache_type_v: None,
            speculative: None,
        }
    }
}

impl TierConfig {
    /// The settings of an in-process engine this tier sets away from their defaults, by their TOML
    /// names (empty for a tier that sets none). An openai tier, or a pool without a local endpoint, may
    /// set none of them: its upstream servers load the model, size their caches and sample and encode
    /// media themselves.
    pub fn local_only_settings(&self) -> Vec<&'static str> {
        let d = Self::default();
        [
            ("keep_alive_secs", self.keep_alive_secs != d.keep_alive_secs),
            ("kv_bits", self.kv_bits.is_some()),
            ("kv_group_size", self.kv_group_size != d.kv_group_size),
            (
                "quantized_kv_start",
                self.quantized_kv_start != d.quantized_kv_start,
            ),
            ("context_length", self.context_length.is_some()),
            ("preload", self.preload != d.preload),
            ("mmproj", self.mmproj.is_some()),
            ("image_tokens", self.image_tokens.is_some()),
            ("video_tokens", self.video_tokens.is_some()),
            ("flash_attention", self.flash_attention.is_some()),
            ("cache_type_k", self.cache_type_k.is_some()),
            ("cache_type_v", self.cache_type_v.is_some()),
            ("video_frames", self.video_frames.is_some()),
            ("video_seconds", self.video_seconds.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }
}

impl Config {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self, RouterError> {
        let s = std::fs::read_to_string(path)
            .map_err(|e| RouterError::Config(format!("{}: {e}", path.display())))?;
        Self::parse(&s).map_err(|e| match e {
            // Already a configuration error: say where, without saying "configuration" twice.
            RouterError::Config(m) => RouterError::Config(format!("{}: {m}", path.display())),
            e => RouterError::Config(format!("{}: {e}", path.display())),
        })
    }

    /// Parses TOML text.
    pub fn parse(s: &str) -> Result<Self, RouterError> {
        let c: Config = toml::from_str(s).map_err(|e| RouterError::Config(e.to_string()))?;
        c.check()?;
        Ok(c)
    }

    /// Consistency checks that serde cannot express.
    pub fn check(&self) -> Result<(), RouterError> {
        // Audio arrives only inline, as base64 in the JSON body (4 characters per 3 bytes): a clip the
        // limits accept must fit the body the server reads, or the limit is a promise nobody can use.
        let inline_audio = self.limits.max_audio_bytes.div_ceil(3) * 4;
        if inline_audio > self.server.max_body_bytes {
            return Err(RouterError::Config(format!(
                "limits.max_audio_bytes = {} cannot arrive: in base64 that is {inline_audio} bytes, over \
                 [server] max_body_bytes = {}; raise max_body_bytes or lower max_audio_bytes",
                self.limits.max_audio_bytes, self.server.max_body_bytes
            )));
        }
        for (t, c) in &self.tiers {
            // Whether this node's engine serves the tier (or one endpoint of its pool).
            let local = if !c.endpoints.is_empty() {
                check_pool(*t, c)?;
                c.endpoints.iter().any(|e| e.kind() == EndpointKind::Local)
            } else {
                match c.kind {
                    TierKind::Local if c.model.is_empty() => {
                        return Err(RouterError::Config(format!(
                            "tiers.{t}: a local tier needs model = \"<model directory or .gguf file>\" \
                             (a disabled one too: it can be switched on while serving)"
                        )));
                    }
                    TierKind::Local if c.url.is_some() || c.api_key.is_some() => {
                        return Err(RouterError::Config(format!(
                            "tiers.{t}: url and api_key are an openai tier's; a local tier serves its \
                             model on this machine: remove them, or set kind = \"openai\""
                        )));
                    }
                    TierKind::Local if c.dialect != Dialect::Auto => {
                        return Err(RouterError::Config(format!(
                            "tiers.{t}: dialect is an openai tier's (what its upstream calls the fields \
                             OpenAI lacks); a local tier's engine reads them all: remove it"
                        )));
                    }
                    TierKind::Openai if c.url.as_deref().unwrap_or("").is_empty() => {
                        return Err(RouterError::Config(format!(
                            "tiers.{t}: an openai tier needs url"
                        )));
                    }
                    _ => {}
                }
                c.kind == TierKind::Local
            };
            // An upstream loads, caches, samples video and encodes media on its own terms: these
            // settings of the in-process engines would be silently ignored on it.
            if !local && let Some(key) = c.local_only_settings().first() {
                return Err(RouterError::Config(format!(
                    "tiers.{t}: {key} is a setting of local tiers (the in-process engine's); an \
                     upstream chooses its own: remove it"
                )));
            }
            if c.max_concurrency == Some(0) {
                return Err(RouterError::Config(format!(
                    "tiers.{t}: max_concurrency must be >= 1"
                )));
            }
            if !(c.first_token_timeout_secs > 0.0 && c.idle_timeout_secs > 0.0) {
                return Err(RouterError::Config(format!(
                    "tiers.{t}: timeouts must be positive"
                )));
            }
            // libmtmd's range for Gemma 4 (its budgets run from 70 to 1120 soft tokens).
            for (key, n) in [
                ("image_tokens", c.image_tokens),
                ("video_tokens", c.video_tokens),
            ] {
                if let Some(n) = n
                    && !(1..=1120).contains(&n)
                {
                    return Err(RouterError::Config(format!(
                        "tiers.{t}: {key} must be 1 to 1120 (Gemma 4's budgets: 70, 140, 280, 560, \
                         1120), not {n}"
                    )));
                }
            }
            // Checked here rather than at each request's start, where a bad width used to surface.
            if let Some(bits) = c.kv_bits {
                if ![2, 3, 4, 5, 6, 8].contains(&bits) {
                    return Err(RouterError::Config(format!(
                        "tiers.{t}: kv_bits must be 2, 3, 4, 5, 6 or 8 (MLX's quantized widths), not {bits}"
                    )));
                }
                if c.kv_group_size <= 0 {
                    return Err(RouterError::Config(format!(
                        "tiers.{t}: kv_group_size must be positive (64 by default), not {}",
                        c.kv_group_size
                    )));
                }
            }
            if let Some(v) = c.cache_type_v.filter(|v| v.is_quantized())
                && c.flash_attention == Some(FlashAttention::Off)
            {
                return Err(RouterError::Config(format!(
                    "tiers.{t}: llama.cpp reads a quantized V cache (cache_type_v = \"{}\") only with \
                     flash attention: remove flash_attention = \"off\" or set cache_type_v to f16",
                    v.name()
                )));
            }
            if let Some(sp) = &c.speculative {
                let bad = if !local {
                    Some(
                        "only a local tier can speculate (an upstream server speculates itself); remove this section",
                    )
                } else if !(1..=16).contains(&sp.max_draft_tokens) {
                    Some("max_draft_tokens must be 1 to 16")
                } else if sp.max_batch == 0 {
                    Some("max_batch must be >= 1")
                } else if sp.enabled
                    && c.kv_bits.is_some()
                    && sp.draft_model.is_empty()
                    // A GGUF tier is told at start that kv_bits is not its setting at all.
                    && !c.model.ends_with(".gguf")
                {
                    Some(
                        "with kv_bits a draft model must be named: the assistant drafter found beside a model \
                         reads the model's KV cache in full precision, which kv_bits quantizes; set draft_model \
                         (a smaller Gemma with the same tokenizer), remove kv_bits, or set enabled = false",
                    )
                } else {
                    None
                };
                if let Some(why) = bad {
                    return Err(RouterError::Config(format!("tiers.{t}.speculative: {why}")));
                }
            }
        }
        Ok(())
    }

    /// Applies environment overrides: `JEMMA_HOST`, `JEMMA_PORT`, and per tier `JEMMA_<TIER>_MODEL`,
    /// `_URL`, `_API_KEY`, `_ENABLED`, `_KIND` (e.g. `JEMMA_HEAVY_URL`).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), RouterError> {
        if let Some(h) = get("JEMMA_HOST") {
            self.server.host = h;
        }
        if let Some(p) = get("JEMMA_PORT") {
            self.server.port = p
                .parse()
                .map_err(|_| RouterError::Config(format!("JEMMA_PORT={p} is not a port")))?;
        }
        for t in Tier::ALL {
            let up = t.as_str().to_uppercase();
            let var = |k: &str| get(&format!("JEMMA_{up}_{k}"));
            let any = ["MODEL", "URL", "API_KEY", "ENABLED", "KIND"]
                .iter()
                .any(|k| var(k).is_some());
            if !any {
                continue;
            }
            let c = self.tiers.entry(t).or_default();
            if let Some(v) = var("KIND") {
                c.kind = match v.as_str() {
                    "local" => TierKind::Local,
                    "openai" => TierKind::Openai,
                    _ => {
                        return Err(RouterError::Config(format!(
                            "JEMMA_{up}_KIND={v}: expected local or openai"
                        )));
                    }
                };
            }
            if let Some(v) = var("MODEL") {
                c.model = v;
            }
            if let Some(v) = var("URL") {
                c.url = Some(v);
                if var("KIND").is_none() {
                    c.kind = TierKind::Openai;
                }
            }
            if let Some(v) = var("API_KEY") {
                c.api_key = Some(v);
            }
            if let Some(v) = var("ENABLED") {
                c.enabled = matches!(v.as_str(), "1" | "true" | "yes" | "on");
            }
        }
        self.check()
    }
}

fn check_pool(t: Tier, c: &TierConfig) -> Result<(), RouterError> {
    let err = |m: String| Err(RouterError::Config(format!("tiers.{t}: {m}")));
    // What an upstream tier sets on itself belongs to each endpoint in a pool; left on the tier it would be
    // silently ignored.
    if c.url.is_some() {
        return err("a pool lists its URLs in [[endpoints]]; remove the tier's own url".into());
    }
    if c.api_key.is_some() {
        return err("a pool's keys go on its [[endpoints]]; remove the tier's own api_key".into());
    }
    if c.kind == TierKind::Openai {
        return err(
            "a pool's endpoints say their own kind; remove the tier's kind = \"openai\"".into(),
        );
    }
    if c.dialect != Dialect::Auto {
        return err(
            "a pool's endpoints each speak their own; set dialect on each [[endpoints]]".into(),
        );
    }
    if c.max_concurrency.is_some() {
        return err(
            "a pool runs what its endpoints run together; set max_concurrency on each [[endpoints]]"
                .into(),
        );
    }
    // NaN is not positive either.
    if c.probe_interval_secs.is_nan()
        || c.probe_interval_secs <= 0.0
        || c.unhealthy_threshold == 0
        || c.healthy_threshold == 0
    {
        return err(
            "probe_interval_secs must be positive and the health thresholds at least 1".into(),
        );
    }
    let mut labels = std::collections::BTreeSet::new();
    let mut locals = 0;
    for (i, e) in c.endpoints.iter().enumerate() {
        let at = format!("endpoints[{i}]");
        match e.kind() {
            EndpointKind::Local => {
                locals += 1;
                if c.model.is_empty() {
                    return err(format!(
                        "{at}: a local endpoint serves the tier's model; set model = \"<model dir>\""
                    ));
                }
                if e.url.is_some() {
                    return err(format!("{at}: a local endpoint has no url"));
                }
                // It serves the tier's own model on this machine: these would be silently ignored.
                if e.model.is_some() || e.api_key.is_some() || e.dialect != Dialect::Auto {
                    return err(format!(
                        "{at}: a local endpoint serves the tier's model, with no key: remove its \
                         model, api_key and dialect"
                    ));
                }
            }
            EndpointKind::Jemma | EndpointKind::Openai => {
                if e.url.as_deref().unwrap_or("").is_empty() {
                    return err(format!("{at}: needs url"));
                }
                if e.kind() == EndpointKind::Jemma && e.dialect != Dialect::Auto {
                    return err(format!(
                        "{at}: a Jemma node speaks Jemma's own dialect; remove dialect (or set kind = \"openai\")"
                    ));
                }
            }
        }
        if !(e.weight > 0.0 && e.weight.is_finite()) {
            return err(format!("{at}: weight must be positive"));
        }
        if e.max_concurrency == Some(0) {
            return err(format!("{at}: max_concurrency must be >= 1"));
        }
        if !labels.insert(e.label()) {
            return err(format!(
                "{at}: two endpoints are both called {:?}; give one a name",
                e.label()
            ));
        }
    }
    if locals > 1 {
        return err(
            "at most one local endpoint per pool (this node runs one engine per tier)".into(),
        );
    }
    Ok(())
}

/// Resolves a secret reference: `env:VAR`, `keyring:…` through `keyring` (the app's keychain), else the
/// literal value.
pub fn resolve_secret(
    value: &str,
    keyring: &dyn Fn(&str) -> Option<String>,
) -> Result<String, RouterError> {
    if let Some(var) = value.strip_prefix("env:") {
        std::env::var(var)
            .map_err(|_| RouterError::Config(format!("environment variable {var} is not set")))
    } else if let Some(k) = value.strip_prefix("keyring:") {
        keyring(k).ok_or_else(|| RouterError::Config(format!("no keychain entry {k}")))
    } else {
        Ok(value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.server.host, "127.0.0.1");
        assert_eq!(c.server.port, 8080);
        assert_eq!(c.breaker.failure_threshold, 3);
        assert!(c.tiers.is_empty());
    }

    #[test]
    fn media_fetch_limits_keep_their_first_names_and_unknown_limits_are_refused() {
        let c = Config::parse(
            "[limits]\nfetch_private_image_urls = true\nimage_fetch_timeout_secs = 3.0\n",
        )
        .unwrap();
        assert!(c.limits.fetch_private_media_urls);
        assert_eq!(c.limits.media_fetch_timeout_secs, 3.0);
        let c = Config::parse("[limits]\nfetch_private_media_urls = true\n").unwrap();
        assert!(c.limits.fetch_private_media_urls);
        let e = Config::parse("[limits]\nmax_video_seconds = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn speculative_settings_parse_and_are_checked() {
        let c = Config::parse(
            "[tiers.primary]\nmodel = \"/m/e4b\"\n[tiers.primary.speculative]\ndraft_model = \"/m/e2b\"\n",
        )
        .unwrap();
        let sp = c.tiers[&Tier::Primary].speculative.clone().unwrap();
        assert_eq!(sp.draft_model, "/m/e2b");
        assert!(sp.enabled && sp.adaptive);
        assert_eq!((sp.max_draft_tokens, sp.max_batch), (4, 1));
        for (extra, why) in [
            ("max_draft_tokens = 0", "max_draft_tokens"),
            ("max_draft_tokens = 17", "max_draft_tokens"),
            ("max_batch = 0", "max_batch"),
            ("draft = \"x\"", "unknown field"),
        ] {
            let toml = format!(
                "[tiers.primary]\nmodel = \"/m\"\n[tiers.primary.speculative]\ndraft_model = \"/d\"\n{extra}\n"
            );
            let e = Config::parse(&toml).unwrap_err().to_string();
            assert!(e.contains(why), "{extra}: {e}");
        }
        // kv_bits speculates with a named draft model, not with the assistant found beside the model.
        Config::parse(
            "[tiers.primary]\nmodel = \"/m\"\nkv_bits = 8\n[tiers.primary.speculative]\ndraft_model = \"/d\"\n",
        )
        .unwrap();
        let e = Config::parse(
            "[tiers.primary]\nmodel = \"/m\"\nkv_bits = 8\n[tiers.primary.speculative]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("draft model must be named"), "{e}");
        // No draft_model: the drafter found next to the model.
        let c = Config::parse("[tiers.primary]\nmodel = \"/m\"\n[tiers.primary.speculative]\n")
            .unwrap();
        assert_eq!(
            c.tiers[&Tier::Primary]
                .speculative
                .as_ref()
                .unwrap()
                .draft_model,
            ""
        );
        let e = Config::parse(
            "[tiers.heavy]\nkind = \"openai\"\nurl = \"http://x\"\n[tiers.heavy.speculative]\ndraft_model = \"/d\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("only a local tier"), "{e}");
        // Catalog names and Hub repos, as for a tier's model.
        Config::parse(
            "[tiers.primary]\nmodel = \"/m\"\n[tiers.primary.speculative]\ndraft_model = \"gemma-4-e2b\"\n",
        )
        .unwrap();
    }

    /// An audio limit the body limit cannot carry (audio arrives only inline, in base64) is refused.
    #[test]
    fn the_audio_limit_fits_the_body_limit() {
        let d = Config::default();
        assert!(d.limits.max_audio_bytes.div_ceil(3) * 4 <= d.server.max_body_bytes);
        let e = Config::parse("[limits]\nmax_audio_bytes = 30000000\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_audio_bytes") && e.contains("max_body_bytes"),
            "{e}"
        );
        Config::parse(
            "[server]\nmax_body_bytes = 41000000\n[limits]\nmax_audio_bytes = 30000000\n",
        )
        .unwrap();
    }

    /// The SSE comment interval has its own name; the old one, shared with tiers' model unload, still reads.
    #[test]
    fn sse_keep_alive_has_its_own_name() {
        let c = Config::parse("[server]\nsse_keep_alive_secs = 2.0\n").unwrap();
        assert_eq!(c.server.sse_keep_alive_secs, 2.0);
        let c = Config::parse("[server]\nkeep_alive_secs = 3.0\n").unwrap();
        assert_eq!(c.server.sse_keep_alive_secs, 3.0);
    }

    /// A KV width MLX cannot quantize to is refused at load, not at each request.
    #[test]
    fn kv_bits_are_mlx_widths() {
        Config::parse("[tiers.fast]\nmodel = \"/m\"\nkv_bits = 4\n").unwrap();
        for (bad, why) in [
            ("kv_bits = 7", "kv_bits must be"),
            ("kv_bits = 16", "kv_bits must be"),
            ("kv_bits = 4\nkv_group_size = 0", "kv_group_size must be"),
        ] {
            let e = Config::parse(&format!("[tiers.fast]\nmodel = \"/m\"\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// llama.cpp's KV cache types go by ggml's names (llama-server's `--cache-type-k`); another name is
    /// refused naming the ones there are, and a quantized V cache with flash attention off (which
    /// llama.cpp cannot read) is refused naming both settings.
    #[test]
    fn cache_types_are_llama_cpps() {
        let gguf =
            |extra: &str| Config::parse(&format!("[tiers.fast]\nmodel = \"x.gguf\"\n{extra}\n"));
        let c = gguf("cache_type_k = \"q8_0\"\ncache_type_v = \"iq4_nl\"").unwrap();
        let t = &c.tiers[&Tier::Fast];
        assert_eq!(
            (t.cache_type_k, t.cache_type_v),
            (Some(CacheType::Q8_0), Some(CacheType::Iq4_nl))
        );
        assert_eq!(CacheType::Iq4_nl.name(), "iq4_nl");
        // The command line's names are the TOML's.
        for t in CacheType::ALL {
            let toml = gguf(&format!("cache_type_k = \"{}\"", t.name())).unwrap();
            assert_eq!(toml.tiers[&Tier::Fast].cache_type_k, Some(t));
            assert_eq!(t.name().parse::<CacheType>(), Ok(t));
        }
        let e = "q4_k".parse::<CacheType>().unwrap_err();
        assert!(e.contains("q4_k") && e.contains("iq4_nl"), "{e}");
        for (name, quantized) in [
            ("f32", false),
            ("bf16", false),
            ("q5_1", true),
            ("q4_1", true),
        ] {
            let t = gguf(&format!("cache_type_k = \"{name}\"")).unwrap().tiers[&Tier::Fast]
                .cache_type_k;
            assert_eq!(t.map(CacheType::name), Some(name));
            assert_eq!(t.unwrap().is_quantized(), quantized, "{name}");
        }
        let e = gguf("cache_type_k = \"q4_k\"").unwrap_err().to_string();
        assert!(e.contains("q4_k") && e.contains("q8_0"), "{e}");
        // K may be quantized without flash attention; V may not.
        gguf("cache_type_k = \"q8_0\"\nflash_attention = \"off\"").unwrap();
        gguf("cache_type_v = \"f32\"\nflash_attention = \"off\"").unwrap();
        let e = gguf("cache_type_v = \"q8_0\"\nflash_attention = \"off\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cache_type_v = \"q8_0\"")
                && e.contains("flash_attention")
                && e.contains("tiers.fast"),
            "{e}"
        );
    }

    #[test]
    fn tiers_parse_and_are_checked() {
        let c = Config::parse(
            r#"
[tiers.fast]
model = "/models/e2b"
[tiers.heavy]
kind = "openai"
url = "https://heavy.example/v1"
api_key = "env:HEAVY_API_KEY"
enabled = false
first_token_timeout_secs = 600
"#,
        )
        .unwrap();
        assert_eq!(c.tiers[&Tier::Heavy].kind, TierKind::Openai);
        assert!(!c.tiers[&Tier::Heavy].enabled);
        assert_eq!(c.tiers[&Tier::Fast].kind, TierKind::Local);
        assert!(
            Config::parse("[tiers.heavy]\nkind = \"openai\"\n")
                .unwrap_err()
                .to_string()
                .contains("url")
        );
        assert!(
            Config::parse("[tiers.fast]\nkind = \"local\"\n")
                .unwrap_err()
                .to_string()
                .contains("model")
        );
        assert!(
            Config::parse("[server]\nprot = 1\n").is_err(),
            "typos are errors"
        );
        assert!(
            Config::parse("[tiers.huge]\nmodel = \"x\"\n").is_err(),
            "unknown tier names are errors"
        );
        for n in [0, 1121] {
            assert!(
                Config::parse(&format!(
                    "[tiers.fast]\nmodel = \"x.gguf\"\nimage_tokens = {n}\n"
                ))
                .unwrap_err()
                .to_string()
                .contains("image_tokens"),
                "image_tokens = {n}"
            );
        }
        let fa = |v: &str| {
            Config::parse(&format!(
                "[tiers.fast]\nmodel = \"x.gguf\"\nflash_attention = {v}\n"
            ))
        };
        assert_eq!(
            fa("\"off\"").unwrap().tiers[&Tier::Fast].flash_attention,
            Some(FlashAttention::Off)
        );
        assert!(
            fa("\"sometimes\"").is_err(),
            "llama.cpp's three policies only"
        );
        assert!(fa("false").is_err(), "a policy, not a boolean");
        let upstream = Config::parse(
            "[tiers.heavy]\nkind = \"openai\"\nmodel = \"m\"\nurl = \"http://x\"\nflash_attention = \"off\"\n",
        );
        assert!(
            upstream
                .unwrap_err()
                .to_string()
                .contains("flash_attention"),
            "refused on an openai tier"
        );
    }

    #[test]
    fn a_dialect_is_an_upstreams_setting() {
        let c = Config::parse(
            "[tiers.heavy]\nkind = \"openai\"\nmodel = \"m\"\nurl = \"http://x\"\ndialect = \"llama-server\"\n",
        )
        .unwrap();
        assert_eq!(c.tiers[&Tier::Heavy].dialect, Dialect::LlamaServer);
        let e = Config::parse(
            "[tiers.heavy]\nkind = \"openai\"\nmodel = \"m\"\nurl = \"http://x\"\ndialect = \"tgi\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("dialect") && e.contains("llama-server"), "{e}");
        // A local engine reads every field; a pool's endpoints each say their own; a Jemma node speaks
        // Jemma's.
        for (toml, word) in [
            (
                "[tiers.fast]\nmodel = \"x.gguf\"\ndialect = \"openai\"\n",
                "local tier",
            ),
            (
                "[tiers.fast]\ndialect = \"vllm\"\n[[tiers.fast.endpoints]]\nurl = \"http://x\"\n",
                "each [[endpoints]]",
            ),
            (
                "[tiers.fast]\n[[tiers.fast.endpoints]]\nkind = \"jemma\"\nurl = \"http://x\"\ndialect = \"vllm\"\n",
                "Jemma node",
            ),
            (
                "[tiers.fast]\nmodel = \"x.gguf\"\n[[tiers.fast.endpoints]]\nkind = \"local\"\ndialect = \"vllm\"\n",
                "dialect",
            ),
        ] {
            let e = Config::parse(toml).unwrap_err().to_string();
            assert!(e.contains(word), "{toml}: {e}");
        }
        let c = Config::parse(
            "[tiers.fast]\n[[tiers.fast.endpoints]]\nurl = \"http://x\"\ndialect = \"openai\"\n",
        )
        .unwrap();
        assert_eq!(c.tiers[&Tier::Fast].endpoints[0].dialect, Dialect::Openai);
    }

    #[test]
    fn an_openai_tier_refuses_every_setting_of_the_local_engines() {
        let upstream = |extra: &str| {
            Config::parse(&format!(
                "[tiers.heavy]\nkind = \"openai\"\nmodel = \"m\"\nurl = \"http://x\"\n{extra}\n"
            ))
        };
        assert!(upstream("").is_ok());
        // Written at its default value, a setting changes nothing and is let through.
        assert!(upstream("keep_alive_secs = 300\npreload = true").is_ok());
        for (key, line) in [
            ("keep_alive_secs", "keep_alive_secs = 60"),
            ("kv_bits", "kv_bits = 8"),
            ("kv_group_size", "kv_group_size = 32"),
            ("quantized_kv_start", "quantized_kv_start = 0"),
            ("context_length", "context_length = 4096"),
            ("preload", "preload = false"),
            ("mmproj", "mmproj = \"/m/mmproj.gguf\""),
            ("image_tokens", "image_tokens = 280"),
            ("video_tokens", "video_tokens = 70"),
            ("flash_attention", "flash_attention = \"on\""),
            ("cache_type_k", "cache_type_k = \"q8_0\""),
            ("cache_type_v", "cache_type_v = \"q4_0\""),
            ("video_frames", "video_frames = 4"),
            ("video_seconds", "video_seconds = 10.0"),
        ] {
            let e = upstream(line).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("tiers.heavy"), "{line}: {e}");
        }
        // A pool of upstreams likewise; one with this node's engine among them keeps them.
        let pool = |endpoint: &str| {
            Config::parse(&format!(
                "[tiers.heavy]\nmodel = \"x.gguf\"\nkv_bits = 8\n[[tiers.heavy.endpoints]]\n{endpoint}\n"
            ))
        };
        let e = pool("kind = \"openai\"\nurl = \"http://x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kv_bits"), "{e}");
        assert!(pool("kind = \"local\"").is_ok());
        let e = pool("kind = \"local\"\nmodel = \"other\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("endpoints[0]") && e.contains("model"), "{e}");
        // A local tier has no upstream to send a key to.
        let e = Config::parse("[tiers.fast]\nmodel = \"x.gguf\"\napi_key = \"k\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("api_key"), "{e}");
        // The same lines stay a local tier's.
        assert!(
            Config::parse("[tiers.fast]\nmodel = \"x.gguf\"\nkv_bits = 8\ncontext_length = 4096\n")
                .is_ok()
        );
    }

    #[test]
    fn the_documented_example_config_parses() {
        let c = Config::parse(include_str!("../../../docs/jemma.example.toml")).unwrap();
        assert_eq!(c.peers.port, 8080);
        assert_eq!(c.tiers.len(), 3);
    }

    #[test]
    fn a_peer_joining_makes_a_tier_a_pool_that_passes_the_checks() {
        let mut c = Config::parse(
            "[tiers.primary]\nmodel = \"/m/e4b\"\nmax_concurrency = 3\n\
             [tiers.heavy]\nkind = \"openai\"\nurl = \"https://heavy.run.app\"\napi_key = \"env:K\"\nmodel = \"gemma-4-26b-a4b\"\n",
        )
        .unwrap();
        let peer = |name: &str| EndpointConfig {
            kind: Some(EndpointKind::Jemma),
            name: Some(name.into()),
            url: Some("http://100.1.2.3:8080".into()),
            ..EndpointConfig::default()
        };
        for t in [Tier::Primary, Tier::Heavy] {
            c.tiers.get_mut(&t).unwrap().join(peer("mini-2"));
        }
        c.tiers
            .get_mut(&Tier::Primary)
            .unwrap()
            .join(peer("mini-3"));
        c.check().unwrap();
        let p = &c.tiers[&Tier::Primary];
        assert_eq!(
            p.endpoints
                .iter()
                .map(EndpointConfig::label)
                .collect::<Vec<_>>(),
            ["local", "mini-2", "mini-3"]
        );
        // The engine keeps its concurrency; the tier runs what all three do.
        assert_eq!(p.endpoints[0].max_concurrency, Some(3));
        assert_eq!(p.concurrency(), 3 + 4 + 4);
        let h = &c.tiers[&Tier::Heavy];
        let own = &h.endpoints[0];
        assert_eq!(
            (
                own.kind(),
                own.url.as_deref(),
                own.api_key.as_deref(),
                own.probe
            ),
            (
                EndpointKind::Openai,
                Some("https://heavy.run.app"),
                Some("env:K"),
                false
            ),
            "the upstream moves onto its endpoint, unprobed as before"
        );
        assert_eq!(own.model.as_deref(), Some("gemma-4-26b-a4b"));
    }

    #[test]
    fn pools_parse_and_are_checked() {
        let c = Config::parse(
            r#"
[tiers.primary]
model = "/models/e4b"
probe_interval_secs = 1
[[tiers.primary.endpoints]]
kind = "local"
max_concurrency = 2
[[tiers.primary.endpoints]]
kind = "jemma"
url = "http://mini-2.tail1234.ts.net:8080"
key = "env:PEER_KEY"
[[tiers.primary.endpoints]]
url = "http://gpu-box:8000/v1"
model = "google/gemma-4-E4B-it"
weight = 3
max_concurrency = 16
"#,
        )
        .unwrap();
        let p = &c.tiers[&Tier::Primary];
        let kinds: Vec<_> = p.endpoints.iter().map(EndpointConfig::kind).collect();
        assert_eq!(
            kinds,
            [
                EndpointKind::Local,
                EndpointKind::Jemma,
                EndpointKind::Openai
            ]
        );
        let labels: Vec<_> = p.endpoints.iter().map(EndpointConfig::label).collect();
        assert_eq!(
            labels,
            ["local", "mini-2.tail1234.ts.net:8080", "gpu-box:8000"]
        );
        assert_eq!(p.endpoints[1].api_key.as_deref(), Some("env:PEER_KEY"));
        // The tier runs what its endpoints run together (jemma peers default to 4).
        assert_eq!(p.concurrency(), 2 + 4 + 16);
        for (bad, why) in [
            ("[[tiers.fast.endpoints]]\nkind = \"jemma\"\n", "needs url"),
            (
                "[tiers.fast]\nmodel = \"m\"\n[[tiers.fast.endpoints]]\n[[tiers.fast.endpoints]]\nname = \"x\"\n",
                "at most one local",
            ),
            (
                "[[tiers.fast.endpoints]]\nkind = \"local\"\n",
                "serves the tier's model",
            ),
            (
                "[[tiers.fast.endpoints]]\nurl = \"http://a\"\nweight = 0\n",
                "weight must be positive",
            ),
            (
                "[[tiers.fast.endpoints]]\nurl = \"http://a:1\"\n[[tiers.fast.endpoints]]\nurl = \"http://a:1/v1\"\n",
                "give one a name",
            ),
            (
                "[tiers.fast]\nurl = \"http://b\"\n[[tiers.fast.endpoints]]\nurl = \"http://a\"\n",
                "remove the tier's own url",
            ),
            (
                "[tiers.fast]\napi_key = \"k\"\n[[tiers.fast.endpoints]]\nurl = \"http://a\"\n",
                "remove the tier's own api_key",
            ),
            (
                "[tiers.fast]\nmax_concurrency = 8\n[[tiers.fast.endpoints]]\nurl = \"http://a\"\n",
                "set max_concurrency on each",
            ),
        ] {
            let e = Config::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn env_overrides() {
        let mut c = Config::default();
        let env = |k: &str| match k {
            "JEMMA_PORT" => Some("9000".to_string()),
            "JEMMA_HEAVY_URL" => Some("http://127.0.0.1:9001".to_string()),
            "JEMMA_HEAVY_ENABLED" => Some("false".to_string()),
            _ => None,
        };
        c.apply_env(env).unwrap();
        assert_eq!(c.server.port, 9000);
        assert_eq!(c.tiers[&Tier::Heavy].kind, TierKind::Openai);
        assert!(!c.tiers[&Tier::Heavy].enabled);
    }

    #[test]
    fn memory_and_models_sections() {
        let c = Config::parse(
            "[memory]\nlimit = \"12GiB\"\nheadroom = 536870912\npressure = \"off\"\n\
             [models]\nauto_download = false\n[tiers.fast]\nmodel = \"gemma-4-e2b\"\ncontext_length = 8192\npreload = false\n",
        )
        .unwrap();
        assert_eq!(c.memory.limit, Some(ByteSize(12 << 30)));
        assert_eq!(c.memory.headroom, ByteSize(512 << 20));
        assert!(!c.models.auto_download);
        assert_eq!(c.tiers[&Tier::Fast].context_length, Some(8192));
        assert_eq!(parse_bytes("1.5 GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("64k").unwrap(), 65536);
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(Config::parse("[memory]\nlimit = \"lots\"\n").is_err());
    }

    #[test]
    fn secrets() {
        let kr = |k: &str| (k == "jemma/heavy").then(|| "from-keychain".to_string());
        assert_eq!(resolve_secret("literal", &kr).unwrap(), "literal");
        assert_eq!(
            resolve_secret("keyring:jemma/heavy", &kr).unwrap(),
            "from-keychain"
        );
        assert!(resolve_secret("keyring:nope", &kr).is_err());
        assert!(resolve_secret("env:JEMMA_SURELY_UNSET_VAR", &kr).is_err());
    }
}
