//! Jemma's operating-system integration, shared by the headless `jemma` CLI and the menu-bar app:
//!
//! - [`tailscale`]: tailnet status and HTTPS exposure of the gateway, by driving the `tailscale` CLI (the
//!   same tool a user would run, so what Jemma does can be reproduced and undone by hand);
//! - [`secrets`]: API keys and tokens in the OS keychain instead of config files;
//! - [`launchd`]: the headless gateway as a macOS LaunchAgent.
//!
//! Nothing here knows HTTP servers or the UI toolkit: callers map [`Error`] to responses or menu items.
#![deny(missing_docs)]

// keyring 3 silently falls back to a non-persistent mock store on targets without a native one; refusing to
// build is better than an app that "saves" keys and forgets them.
#[cfg(not(any(target_os = "macos", target_os = "linux", target_os = "windows")))]
compile_error!("jemma-platform supports macOS, Linux and Windows (keychain backends)");

pub mod launchd;
pub mod secrets;
pub mod tailscale;

use std::time::Duration;

/// Everything this crate can fail with. Messages are written for a user reading a menu item or a CLI
/// error, and never contain secret values.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `tailscale` CLI could not be found or started.
    #[error("{0}")]
    NotInstalled(String),
    /// A command ran and exited unsuccessfully.
    #[error("`{cmd}` failed ({}): {stderr}", code.map_or_else(|| "killed by a signal".to_string(), |c| format!("exit code {c}")))]
    Command {
        /// The command line, for the user to re-run by hand.
        cmd: String,
        /// Exit code; `None` when the process was killed by a signal.
        code: Option<i32>,
        /// Its standard error, trimmed (or standard output when stderr was empty).
        stderr: String,
    },
    /// A command did not finish in time and was killed.
    #[error("`{cmd}` did not finish within {}s and was stopped{}", after.as_secs_f32(), if output.is_empty() { String::new() } else { format!(": {output}") })]
    Timeout {
        /// The command line.
        cmd: String,
        /// The time limit it ran past.
        after: Duration,
        /// What it printed before being stopped, trimmed. `tailscale serve` waits for the user to enable
        /// HTTPS on the tailnet and prints the URL to do so; this keeps that URL visible.
        output: String,
    },
    /// A command's output was not what its documented format promises.
    #[error("could not read the output of `{cmd}`: {message}")]
    Parse {
        /// The command line.
        cmd: String,
        /// What was wrong with it.
        message: String,
    },
    /// Starting or waiting for a command failed for a reason other than it being missing.
    #[error("could not run `{cmd}`: {source}")]
    Io {
        /// The command line.
        cmd: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Tailscale is installed but not connected, so nothing can be exposed on the tailnet.
    #[error("{0}")]
    Unavailable(String),
    /// A secret name outside `[a-z0-9_]{1,64}`.
    #[error("invalid secret name {0:?}: use 1 to 64 characters from a-z, 0-9 and _")]
    InvalidSecretName(String),
    /// The OS keychain refused or failed. Carries the keychain's message, never the secret.
    #[error("keychain error for {name}: {message}")]
    Keychain {
        /// The secret's name (account), not its value.
        name: String,
        /// What the keychain reported.
        message: String,
    },
    /// A path that cannot go into a launchd plist (relative, or not UTF-8).
    #[error("{0}")]
    InvalidPath(String),
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
