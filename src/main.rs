//! `jemma`: the headless gateway and engine (servers, launchd, tests). The menu-bar app embeds the same
//! crates; this binary is what runs without a UI.

mod bench_cmd;
// Only the GGUF mask bench (llama.cpp engine) measures it.
#[cfg(any(
    feature = "llama",
    not(all(target_os = "macos", target_arch = "aarch64"))
))]
mod bench_recogniser;
mod doctor;
mod generate_cmd;
mod keys;
mod peers;
mod pull;
mod serve;

use clap::{Parser, Subcommand};

/// Jemma serves Google's Gemma 4 models locally and exposes them as an OpenAI-compatible API.
#[derive(Parser)]
#[command(name = "jemma", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `jemma=debug`. Also read from RUST_LOG.
    #[arg(long, global = true, env = "JEMMA_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check this machine: chip, memory, disk, MLX device and compute dtype, and which tiers it can hold.
    Doctor(doctor::Args),
    /// Run the OpenAI-compatible gateway (default 127.0.0.1:8080) with the configured tiers.
    Serve(serve::Args),
    /// Download models (catalog names or Hugging Face repos) into the Hugging Face cache.
    Pull(pull::Args),
    /// Manage API keys for callers that are not on this machine (tailnet, LAN).
    Keys(keys::Args),
    /// List the other Jemma nodes on this tailnet and the models their tiers serve.
    Peers(peers::Args),
    /// Measure the engine's prefill and decode speed on a model directory.
    Bench(bench_cmd::Args),
    /// Generate text with the in-process MLX engine (prints JSON with --json: tokens, text, tok/s, memory).
    Generate(generate_cmd::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log)),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log redirected to a file (launchd, systemd, `2> log`) stays plain.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Doctor(args) => doctor::run(args),
        Command::Generate(args) => generate_cmd::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench_cmd::run(args),
        Command::Keys(args) => keys::run(args),
        Command::Peers(args) => peers::run(args),
        Command::Pull(args) => pull::run(args),
    }
}
