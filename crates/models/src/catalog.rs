//! `models.toml`: the default checkpoint of every tier, with sizes and memory needs.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{ModelsError, Result};

/// The catalog shipped in the binary.
pub const BUILTIN: &str = include_str!("../models.toml");

/// Checkpoint format, which decides the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// MLX safetensors directory (config.json, tokenizer, shards): the MLX engine.
    Mlx,
    /// One GGUF file: the llama.cpp engine.
    Gguf,
}

/// One catalog entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// One line for humans.
    #[serde(default)]
    pub description: String,
    /// The tier it is meant for (`fast`, `primary`, `heavy`), or `draft` for a Gemma 4 assistant (MTP)
    /// drafter, which serves no tier of its own: it is fetched with the models that name it in
    /// [`Entry::drafter`] and drafts for them.
    pub tier: String,
    /// Format.
    pub format: Format,
    /// Hugging Face repo id.
    pub repo: String,
    /// Branch, tag or commit.
    #[serde(default = "main")]
    pub revision: String,
    /// GGUF: the file in the repo.
    #[serde(default)]
    pub file: Option<String>,
    /// Approximate download size (the Hub's own figures are used once asked).
    #[serde(default)]
    pub download_bytes: u64,
    /// Approximate memory when serving.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Free memory recommended before loading.
    #[serde(default)]
    pub min_free_bytes: u64,
    /// Needs a discrete GPU (the heavy tier: Cloud Run).
    #[serde(default)]
    pub gpu_only: bool,
    /// The catalog name of this model's assistant (MTP) drafter (an MLX `tier = "draft"` entry):
    /// `jemma pull` fetches it with the model, and a local tier serving the model speculates with it
    /// once it is downloaded (see [`Catalog::drafter_of`]).
    #[serde(default)]
    pub drafter: Option<String>,
    /// GGUF: the repo's mmproj file (the model's vision and audio towers, llama.cpp's `--mmproj`):
    /// `jemma pull` fetches it with the model, and a GGUF tier serving the model puts images and audio
    /// before it through libmtmd once it is downloaded.
    #[serde(default)]
    pub mmproj: Option<String>,
}

/// [`Entry::tier`] of an assistant drafter.
pub const DRAFT_TIER: &str = "draft";

fn main() -> String {
    "main".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    models: BTreeMap<String, Entry>,
}

/// Entries by name.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Entries by name.
    pub models: BTreeMap<String, Entry>,
}

impl Catalog {
    /// The built-in catalog.
    #[expect(
        clippy::expect_used,
        reason = "the built-in catalog is compiled in, and a unit test parses it"
    )]
    pub fn builtin() -> Self {
        Self::parse(BUILTIN).expect("the built-in catalog parses (tested)")
    }

    /// Parses catalog TOML.
    pub fn parse(s: &str) -> Result<Self> {
        let f: File = toml::from_str(s).map_err(|e| ModelsError::Catalog(e.to_string()))?;
        for (name, e) in &f.models {
            if e.format == Format::Gguf && e.file.is_none() {
                return Err(ModelsError::Catalog(format!(
                    "models.{name}: a gguf entry needs file = \"….gguf\""
                )));
            }
            if let Some(m) = &e.mmproj
                && (e.format != Format::Gguf || !m.ends_with(".gguf"))
            {
                return Err(ModelsError::Catalog(format!(
                    "models.{name}: mmproj names a .gguf file of a gguf entry's repo"
                )));
            }
            if !e.repo.contains('/') {
                return Err(ModelsError::Catalog(format!(
                    "models.{name}: repo must be owner/name"
                )));
            }
        }
        Ok(Self { models: f.models })
    }

    /// The built-in catalog with a user file's entries added or replacing built-in ones by name.
    pub fn with_overrides(path: Option<&Path>) -> Result<Self> {
        let mut c = Self::builtin();
        if let Some(p) = path.filter(|p| p.exists()) {
            let s = std::fs::read_to_string(p).map_err(|source| ModelsError::Io {
                path: p.to_path_buf(),
                source,
            })?;
            let user = Self::parse(&s)
                .map_err(|e| ModelsError::Catalog(format!("{}: {e}", p.display())))?;
            c.models.extend(user.models);
            c.check_drafters()
                .map_err(|e| ModelsError::Catalog(format!("{}: {e}", p.display())))?;
        }
        Ok(c)
    }

    /// Checks that every [`Entry::drafter`] names an MLX `draft` entry (a user file may name a built-in
    /// one, so this runs on the merged catalog).
    ///
    /// Errors: [`ModelsError::Catalog`] naming the entry.
    pub fn check_drafters(&self) -> Result<()> {
        for (name, e) in &self.models {
            let Some(d) = &e.drafter else { continue };
            match self.models.get(d) {
                Some(_) if e.tier == DRAFT_TIER => {
                    return Err(ModelsError::Catalog(format!(
                        "models.{name}: a drafter names no drafter of its own"
                    )));
                }
                Some(de) if de.tier == DRAFT_TIER && de.format == Format::Mlx => {}
                _ => {
                    return Err(ModelsError::Catalog(format!(
                        "models.{name}: drafter = \"{d}\" must name an entry with tier = \"{DRAFT_TIER}\" \
                         and format = \"mlx\""
                    )));
                }
            }
        }
        Ok(())
    }

    /// The drafter entry (name, entry) of the model `name`, if the catalog pairs it with one.
    pub fn drafter_of(&self, name: &str) -> Option<(&String, &Entry)> {
        let d = self.models.get(name)?.drafter.as_ref()?;
        self.models.get_key_value(d)
    }

    /// The entry whose Hub repo is `repo` (compared without case, as the Hub does), preferring the one
    /// that names a drafter when several share the repo.
    pub fn by_repo(&self, repo: &str) -> Option<(&String, &Entry)> {
        let mut found = self
            .models
            .iter()
            .filter(|(_, e)| e.repo.eq_ignore_ascii_case(repo));
        let first = found.next()?;
        Some(
            std::iter::once(first)
                .chain(found)
                .find(|(_, e)| e.drafter.is_some())
                .unwrap_or(first),
        )
    }

    /// The catalog a configuration names (`[models] catalog`), else the user's default one, on top of the
    /// built-in entries.
    pub fn load(configured: Option<&str>) -> Result<Self> {
        let path = configured
            .map(std::path::PathBuf::from)
            .or_else(Self::user_path);
        Self::with_overrides(path.as_deref())
    }

    /// The user catalog's default place: `$JEMMA_CATALOG`, else `~/.config/jemma/models.toml`.
    pub fn user_path() -> Option<std::path::PathBuf> {
        if let Ok(p) = std::env::var("JEMMA_CATALOG") {
            return Some(p.into());
        }
        std::env::var_os("HOME").map(|h| Path::new(&h).join(".config/jemma/models.toml"))
    }

    /// An entry by name.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.models.get(name)
    }

    /// The default entry of a tier for a format.
    pub fn for_tier(&self, tier: &str, format: Format) -> Option<(&String, &Entry)> {
        self.models
            .iter()
            .find(|(_, e)| e.tier == tier && e.format == format)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_has_every_tier() {
        let c = Catalog::builtin();
        assert_eq!(
            c.for_tier("fast", Format::Mlx).unwrap().1.repo,
            "mlx-community/gemma-4-E2B-it-4bit"
        );
        assert!(c.for_tier("primary", Format::Mlx).is_some());
        let (_, heavy) = c.for_tier("heavy", Format::Gguf).unwrap();
        assert_eq!(heavy.repo, "unsloth/gemma-4-26B-A4B-it-GGUF");
        assert!(heavy.file.as_deref().unwrap().contains("UD-Q4_K_XL"));
        assert!(heavy.gpu_only);
        for e in c.models.values() {
            assert!(
                e.download_bytes > 0 && e.memory_bytes > 0 && e.min_free_bytes >= e.memory_bytes
            );
        }
        c.check_drafters().unwrap();
        // The MLX models of the local tiers come with their assistant drafters; a drafter is no tier's
        // default.
        for name in ["gemma-4-e2b", "gemma-4-e4b"] {
            let (d, de) = c.drafter_of(name).unwrap();
            assert!(
                d.starts_with(name) && de.repo.contains("-it-assistant"),
                "{d}"
            );
        }
        assert!(
            c.models
                .values()
                .all(|e| e.tier != "draft" || e.drafter.is_none())
        );
        assert_eq!(
            c.by_repo("MLX-community/gemma-4-E4B-it-4bit").unwrap().0,
            "gemma-4-e4b"
        );
    }

    #[test]
    fn user_entries_override_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("models.toml");
        std::fs::write(
            &p,
            "[models.gemma-4-e2b]\ntier = \"fast\"\nformat = \"mlx\"\nrepo = \"me/my-e2b\"\n\
             [models.extra]\ntier = \"primary\"\nformat = \"gguf\"\nrepo = \"me/x\"\nfile = \"x.gguf\"\n",
        )
        .unwrap();
        let c = Catalog::with_overrides(Some(&p)).unwrap();
        assert_eq!(c.get("gemma-4-e2b").unwrap().repo, "me/my-e2b");
        assert_eq!(c.get("extra").unwrap().revision, "main");
        assert!(c.get("gemma-4-e4b").is_some(), "built-ins stay");
        std::fs::write(
            &p,
            "[models.bad]\ntier = \"fast\"\nformat = \"gguf\"\nrepo = \"a/b\"\n",
        )
        .unwrap();
        assert!(
            Catalog::with_overrides(Some(&p))
                .unwrap_err()
                .to_string()
                .contains("file")
        );
        // An mmproj belongs to a GGUF entry, and is a .gguf.
        for bad in [
            "format = \"mlx\"\nmmproj = \"mmproj-F16.gguf\"",
            "format = \"gguf\"\nfile = \"x.gguf\"\nmmproj = \"mmproj.bin\"",
        ] {
            std::fs::write(
                &p,
                format!("[models.bad]\ntier = \"fast\"\nrepo = \"a/b\"\n{bad}\n"),
            )
            .unwrap();
            assert!(
                Catalog::with_overrides(Some(&p))
                    .unwrap_err()
                    .to_string()
                    .contains("mmproj"),
                "{bad}"
            );
        }
        let builtin = Catalog::builtin();
        assert!(
            builtin
                .models
                .values()
                .filter(|e| e.format == Format::Gguf)
                .all(|e| e.mmproj.as_deref() == Some("mmproj-F16.gguf")),
            "every built-in GGUF model comes with its towers"
        );
        std::fs::write(
            &p,
            "[models.bad]\ntier = \"fast\"\nformat = \"mlx\"\nrepo = \"a/b\"\ntypo = 1\n",
        )
        .unwrap();
        assert!(Catalog::with_overrides(Some(&p)).is_err());
        // A drafter must be a draft entry, possibly a built-in one.
        std::fs::write(
            &p,
            "[models.mine]\ntier = \"fast\"\nformat = \"mlx\"\nrepo = \"a/b\"\ndrafter = \"gemma-4-e2b-assistant\"\n",
        )
        .unwrap();
        let c = Catalog::with_overrides(Some(&p)).unwrap();
        assert_eq!(c.drafter_of("mine").unwrap().0, "gemma-4-e2b-assistant");
        std::fs::write(
            &p,
            "[models.mine]\ntier = \"fast\"\nformat = \"mlx\"\nrepo = \"a/b\"\ndrafter = \"gemma-4-e4b\"\n",
        )
        .unwrap();
        let e = Catalog::with_overrides(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("drafter") && e.contains("draft"), "{e}");
        std::fs::write(
            &p,
            "[models.d2]\ntier = \"draft\"\nformat = \"mlx\"\nrepo = \"a/b\"\ndrafter = \"gemma-4-e2b-assistant\"\n",
        )
        .unwrap();
        let e = Catalog::with_overrides(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("no drafter of its own"), "{e}");
    }
}
