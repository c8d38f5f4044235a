//! `jemma doctor`: what this machine is and what it can run.

use serde::Serialize;
use sysinfo::System;

/// Arguments of `jemma doctor`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    os: String,
    arch: &'static str,
    cpu: String,
    cpu_cores: usize,
    total_memory_bytes: u64,
    available_memory_bytes: u64,
    mlx: Option<jemma_engine::device::MlxInfo>,
    mlx_error: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut sys = System::new();
    sys.refresh_memory();
    sys.refresh_cpu_all();
    let cpu = sys
        .cpus()
        .first()
        .map(|c| c.brand().trim().to_string())
        .unwrap_or_default();
    let (mlx, mlx_error) = match jemma_engine::device::mlx_info() {
        Ok(info) => (Some(info), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let report = Report {
        os: System::long_os_version().unwrap_or_else(|| std::env::consts::OS.to_string()),
        arch: std::env::consts::ARCH,
        cpu,
        cpu_cores: sys.cpus().len(),
        total_memory_bytes: sys.total_memory(),
        available_memory_bytes: sys.available_memory(),
        mlx,
        mlx_error,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("os           {} ({})", report.os, report.arch);
    println!("cpu          {} ({} cores)", report.cpu, report.cpu_cores);
    println!(
        "memory       {:.1} GiB total, {:.1} GiB available",
        gib(report.total_memory_bytes),
        gib(report.available_memory_bytes)
    );
    match (&report.mlx, &report.mlx_error) {
        (Some(m), _) => {
            println!(
                "mlx          {} on {:?} (metal available: {}), compute dtype {}",
                m.mlx_version, m.device, m.metal_available, m.compute_dtype
            );
            if m.device == jemma_engine::device::DeviceKind::Cpu {
                println!(
                    "             MLX's CPU backend is for correctness; llama.cpp is the faster local engine here"
                );
            }
        }
        (None, Some(e)) => println!("mlx          unavailable: {e}"),
        (None, None) => {}
    }
    Ok(())
}
