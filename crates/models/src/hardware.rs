//! What this machine is, and which catalog models it can hold (`jemma doctor`, the app's first launch).

use std::path::Path;

use serde::Serialize;

use crate::catalog::{Catalog, Format};

/// The machine.
#[derive(Debug, Clone, Serialize)]
pub struct Hardware {
    /// OS name and version.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// CPU/chip brand (e.g. "Apple M4").
    pub chip: String,
    /// Logical cores.
    pub cores: usize,
    /// Apple Silicon (MLX on Metal is the engine).
    pub apple_silicon: bool,
    /// Unified/total memory.
    pub total_memory_bytes: u64,
    /// Memory available now.
    pub available_memory_bytes: u64,
    /// Free disk space where models are cached.
    pub disk_free_bytes: Option<u64>,
}

impl Hardware {
    /// Reads the machine; `cache_dir` is where models would be downloaded.
    pub fn detect(cache_dir: &Path) -> Self {
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        sys.refresh_cpu_all();
        let chip = sys
            .cpus()
            .first()
            .map(|c| c.brand().trim().to_string())
            .unwrap_or_default();
        let arch = std::env::consts::ARCH.to_string();
        Self {
            os: sysinfo::System::long_os_version().unwrap_or_else(|| std::env::consts::OS.into()),
            apple_silicon: cfg!(target_os = "macos") && arch == "aarch64",
            arch,
            chip,
            cores: sys.cpus().len(),
            total_memory_bytes: sys.total_memory(),
            available_memory_bytes: sys.available_memory(),
            disk_free_bytes: disk_free(cache_dir),
        }
    }
}

/// Free space on the disk holding `path` (or its nearest existing parent).
pub fn disk_free(path: &Path) -> Option<u64> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        p = p.parent()?.to_path_buf();
    }
    let p = std::fs::canonicalize(&p).ok()?;
    let disks = sysinfo::Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|d| p.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.available_space())
}

/// Verdict for one catalog model on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct Fit {
    /// Catalog name.
    pub model: String,
    /// Tier.
    pub tier: String,
    /// Can run here.
    pub fits: bool,
    /// The engine here would be the right one for the format (MLX on Apple Silicon, llama.cpp elsewhere).
    pub preferred: bool,
    /// Why (one sentence).
    pub reason: String,
}

/// The machine, the verdicts, and a configuration to start from.
#[derive(Debug, Clone, Serialize)]
pub struct Recommendation {
    /// Per model.
    pub fits: Vec<Fit>,
    /// A `jemma.toml` for this machine.
    pub config_toml: String,
}

fn gb(n: u64) -> String {
    format!("{:.1} GB", n as f64 / 1e9)
}

impl Recommendation {
    /// The model to use for `tier`: one that fits and suits this machine's engine, else one that fits.
    pub fn pick(&self, tier: &str) -> Option<String> {
        self.fits
            .iter()
            .find(|f| f.tier == tier && f.fits && f.preferred)
            .or_else(|| self.fits.iter().find(|f| f.tier == tier && f.fits))
            .map(|f| f.model.clone())
    }
}

/// Judges every catalog model against the machine. `metal` says whether MLX sees a Metal GPU; `engines`
/// lists the formats this build can serve locally.
pub fn recommend(
    catalog: &Catalog,
    hw: &Hardware,
    metal: bool,
    engines: &[Format],
) -> Recommendation {
    let mlx_native = hw.apple_silicon && metal;
    let mut fits = vec![];
    // A drafter serves no tier: it comes with the model that names it.
    for (name, e) in catalog
        .models
        .iter()
        .filter(|(_, e)| e.tier != crate::catalog::DRAFT_TIER)
    {
        let preferred = match e.format {
            Format::Mlx => mlx_native,
            Format::Gguf => !mlx_native || e.gpu_only,
        };
        let (ok, reason) = if !e.gpu_only && !engines.contains(&e.format) {
            (
                false,
                "this build has no engine for this format".to_string(),
            )
        } else if e.gpu_only {
            (
                false,
                format!(
                    "needs a GPU with {} of memory: run it as the Cloud Run heavy tier (cloud/heavy/)",
                    gb(e.min_free_bytes)
                ),
            )
        } else if hw.total_memory_bytes < e.min_free_bytes {
            (
                false,
                format!(
                    "needs {} of free memory; this machine has {} in all",
                    gb(e.min_free_bytes),
                    gb(hw.total_memory_bytes)
                ),
            )
        } else if hw.disk_free_bytes.is_some_and(|d| d < e.download_bytes) {
            (
                false,
                format!(
                    "needs {} of disk for the download; {} free",
                    gb(e.download_bytes),
                    gb(hw.disk_free_bytes.unwrap_or(0))
                ),
            )
        } else if hw.available_memory_bytes < e.min_free_bytes {
            (
                true,
                format!(
                    "fits ({} when serving) once {} is free; {} is free now",
                    gb(e.memory_bytes),
                    gb(e.min_free_bytes),
                    gb(hw.available_memory_bytes)
                ),
            )
        } else {
            (
                true,
                format!(
                    "fits: {} when serving, {} free now",
                    gb(e.memory_bytes),
                    gb(hw.available_memory_bytes)
                ),
            )
        };
        let reason = if ok && !preferred {
            match e.format {
                Format::Mlx => format!(
                    "{reason}; MLX runs on its CPU backend here (~150x slower than llama.cpp): prefer the GGUF build"
                ),
                Format::Gguf => format!("{reason}; on Apple Silicon the MLX build is faster"),
            }
        } else {
            reason
        };
        fits.push(Fit {
            model: name.clone(),
            tier: e.tier.clone(),
            fits: ok,
            preferred,
            reason,
        });
    }
    let mut rec = Recommendation {
        fits,
        config_toml: String::new(),
    };
    let mut toml = String::from("# Generated by `jemma doctor` for this machine.\n");
    let fast = rec.pick("fast");
    let primary = rec.pick("primary");
    if let Some(m) = &fast {
        toml.push_str(&format!("[tiers.fast]\nmodel = \"{m}\"\n"));
    }
    match (&primary, &fast) {
        (Some(m), _) => toml.push_str(&format!("[tiers.primary]\nmodel = \"{m}\"\n")),
        // Too small for E4B: the fast model answers primary requests too (one engine).
        (None, Some(m)) => toml.push_str(&format!("[tiers.primary]\nmodel = \"{m}\"\n")),
        (None, None) => {}
    }
    toml.push_str(
        "[tiers.heavy]\nkind = \"openai\"\nurl = \"https://YOUR-CLOUD-RUN-URL/v1\"\n\
         api_key = \"keyring:ai.jemma/heavy_api_key\"\nenabled = false\nfirst_token_timeout_secs = 600\n",
    );
    rec.config_toml = toml;
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(total_gb: f64, avail_gb: f64, apple: bool) -> Hardware {
        Hardware {
            os: "test".into(),
            arch: "aarch64".into(),
            chip: "Apple M4".into(),
            cores: 10,
            apple_silicon: apple,
            total_memory_bytes: (total_gb * 1e9) as u64,
            available_memory_bytes: (avail_gb * 1e9) as u64,
            disk_free_bytes: Some(100_000_000_000),
        }
    }

    const ALL: &[Format] = &[Format::Mlx, Format::Gguf];

    fn verdict<'a>(r: &'a Recommendation, m: &str) -> &'a Fit {
        r.fits.iter().find(|f| f.model == m).unwrap()
    }

    #[test]
    fn mac_mini_16gb() {
        let c = Catalog::builtin();
        let r = recommend(&c, &machine(16.0, 10.0, true), true, ALL);
        assert!(verdict(&r, "gemma-4-e2b").fits && verdict(&r, "gemma-4-e2b").preferred);
        assert!(verdict(&r, "gemma-4-e4b").fits);
        let heavy = verdict(&r, "gemma-4-26b-a4b");
        assert!(!heavy.fits && heavy.reason.contains("Cloud Run"));
        assert!(r.config_toml.contains("model = \"gemma-4-e2b\""));
        assert!(r.config_toml.contains("model = \"gemma-4-e4b\""));
        crate::Catalog::parse("").unwrap();
        assert!(
            r.fits.iter().all(|f| f.tier != "draft"),
            "drafters are no tier's pick"
        );
    }

    #[test]
    fn small_machine_and_linux() {
        let c = Catalog::builtin();
        let r = recommend(&c, &machine(5.0, 4.5, true), true, ALL);
        assert!(verdict(&r, "gemma-4-e2b").fits);
        assert!(!verdict(&r, "gemma-4-e4b").fits);
        // The fast model also serves primary requests.
        assert_eq!(r.config_toml.matches("model = \"gemma-4-e2b\"").count(), 2);
        let r = recommend(&c, &machine(24.0, 20.0, false), false, ALL);
        assert!(!verdict(&r, "gemma-4-e2b").preferred);
        assert!(verdict(&r, "gemma-4-e2b").reason.contains("GGUF"));
        assert!(r.config_toml.contains("gemma-4-e2b-gguf"));
        // A build without the llama.cpp engine still recommends something it can run.
        let r = recommend(&c, &machine(24.0, 20.0, false), false, &[Format::Mlx]);
        assert!(!verdict(&r, "gemma-4-e2b-gguf").fits);
        assert!(r.config_toml.contains("model = \"gemma-4-e2b\""));
        let busy = recommend(&c, &machine(16.0, 2.0, true), true, ALL);
        assert!(verdict(&busy, "gemma-4-e4b").reason.contains("once"));
    }
}
