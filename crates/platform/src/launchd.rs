//! The headless gateway (`jemma serve`) as a macOS LaunchAgent, `ai.jemma.gateway`.
//!
//! The template is `launchd/ai.jemma.gateway.plist` at the repository root, compiled in here so the CLI can
//! render it without the source tree; `scripts/launchd-install.sh` renders the same file with `sed`.
//! Placeholders: `__JEMMA_BIN__`, `__JEMMA_CONFIG__`, `__JEMMA_CONFIG_DIR__` (the working directory) and
//! `__LOG_DIR__`.
//!
//! This agent is for machines running Jemma without the menu-bar app. The app registers its own login item
//! through `tauri-plugin-autostart` and runs the gateway in-process, so the two must not both be registered
//! on one Mac: they would start two gateways competing for the same port and memory.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

const LABEL: &str = "ai.jemma.gateway";

const TEMPLATE: &str = include_str!("../../../launchd/ai.jemma.gateway.plist");

/// The agent's launchd label, `ai.jemma.gateway` (its `gui/<uid>/<label>` service name).
pub fn label() -> &'static str {
    LABEL
}

/// The unrendered template, placeholders included.
pub fn template() -> &'static str {
    TEMPLATE
}

/// Where the rendered agent is installed: `~/Library/LaunchAgents/ai.jemma.gateway.plist`.
pub fn agent_path(home: &Path) -> PathBuf {
    home.join("Library/LaunchAgents")
        .join(format!("{LABEL}.plist"))
}

/// Renders the agent for `jemma` at `bin`, serving `config`, logging to `gateway.log` and
/// `gateway.err.log` in `log_dir`; the working directory is the config's directory.
///
/// Paths must be absolute (launchd resolves nothing relative to anything) and UTF-8 (plists are XML text);
/// they are XML-escaped, so any other character is fine. The log directory must exist before the agent
/// starts: launchd does not create it.
pub fn render_plist(bin: &Path, config: &Path, log_dir: &Path) -> Result<String> {
    let bin = plist_path("the jemma binary", bin)?;
    let config_path = plist_path("the config file", config)?;
    let config_dir = config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| {
            Error::InvalidPath(format!(
                "the config file {} has no parent directory",
                config.display()
            ))
        })?;
    let config_dir = plist_path("the config directory", config_dir)?;
    let log_dir = plist_path("the log directory", log_dir)?;
    let log_dir = log_dir.trim_end_matches('/');
    // __JEMMA_CONFIG_DIR__ first: __JEMMA_CONFIG__ is not a prefix of it ("__JEMMA_CONFIG_" vs
    // "__JEMMA_CONFIG__"), but replacing the longer name first keeps that from ever mattering.
    Ok(TEMPLATE
        .replace("__JEMMA_CONFIG_DIR__", &xml_escape(config_dir))
        .replace("__JEMMA_CONFIG__", &xml_escape(config_path))
        .replace("__JEMMA_BIN__", &xml_escape(bin))
        .replace("__LOG_DIR__", &xml_escape(log_dir)))
}

fn plist_path<'a>(what: &str, p: &'a Path) -> Result<&'a str> {
    if !p.is_absolute() {
        return Err(Error::InvalidPath(format!(
            "{what} must be an absolute path for launchd, got {}",
            p.display()
        )));
    }
    p.to_str().ok_or_else(|| {
        Error::InvalidPath(format!("{what} path {} is not valid UTF-8", p.display()))
    })
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_and_path() {
        assert_eq!(label(), "ai.jemma.gateway");
        assert_eq!(
            agent_path(Path::new("/Users/me")),
            Path::new("/Users/me/Library/LaunchAgents/ai.jemma.gateway.plist")
        );
    }

    #[test]
    fn escapes_xml() {
        assert_eq!(xml_escape(r#"a&b<c>"d'"#), "a&amp;b&lt;c&gt;&quot;d&apos;");
    }

    #[test]
    fn rejects_relative_paths() {
        let abs = Path::new("/usr/local/bin/jemma");
        for (bin, config, logs) in [
            (
                Path::new("jemma"),
                Path::new("/c/jemma.toml"),
                Path::new("/l"),
            ),
            (abs, Path::new("jemma.toml"), Path::new("/l")),
            (abs, Path::new("/c/jemma.toml"), Path::new("logs")),
        ] {
            let err = render_plist(bin, config, logs).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidPath(m) if m.contains("absolute")),
                "{err}"
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn rejects_non_utf8_paths() {
        use std::os::unix::ffi::OsStrExt;
        let bad = Path::new(std::ffi::OsStr::from_bytes(b"/tmp/\xff/jemma"));
        let err = render_plist(bad, Path::new("/c/jemma.toml"), Path::new("/l")).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidPath(m) if m.contains("UTF-8")),
            "{err}"
        );
    }
}
