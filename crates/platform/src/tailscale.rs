//! Tailscale status and exposure of the gateway on the tailnet, by running the `tailscale` CLI.
//!
//! The CLI rather than a client library or the LocalAPI socket: it is the interface Tailscale keeps stable
//! across the Homebrew, standalone and App Store builds on macOS (whose LocalAPI sockets live in different
//! places), and every step Jemma takes is a command the user can read in an error, re-run or undo by hand
//! (`tailscale serve --https=443 off`).
//!
//! Every command runs on `tokio::process` with stdin closed and a time limit ([`DEFAULT_TIMEOUT`]); a command
//! that overruns is killed and reported as [`Error::Timeout`], with what it printed so far. Failures are returned, never swallowed: a non-zero exit is
//! [`Error::Command`] with the CLI's own message, unreadable output is [`Error::Parse`].

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::{Error, Result};

/// Environment variable naming the `tailscale` binary to use, ahead of any search.
pub const CLI_ENV: &str = "JEMMA_TAILSCALE_CLI";

/// The CLI inside the macOS app (standalone and App Store builds), which is not on `PATH` unless the user
/// installed the shell integration. launchd agents also start with a bare `PATH`, so this is often the only
/// way the headless gateway finds it.
pub const MACOS_APP_CLI: &str = "/Applications/Tailscale.app/Contents/MacOS/Tailscale";

/// Time limit for one CLI command. Status answers in milliseconds; `serve` can block waiting for the user to
/// enable HTTPS on the tailnet, and a menu click must not hang on that.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTPS port Jemma is served on. 443 so the URL needs no port, and because `tailscale serve` only
/// obtains certificates for 443, 8443 and 10000.
const HTTPS_PORT: &str = "443";

/// Finds the `tailscale` CLI: [`CLI_ENV`], then `tailscale` on `PATH`, then [`MACOS_APP_CLI`].
///
/// `None` when none exists, or when [`CLI_ENV`] names a missing file; [`Tailscale::detect`] says which.
pub fn find_cli() -> Option<PathBuf> {
    locate(
        std::env::var_os(CLI_ENV),
        std::env::var_os("PATH"),
        Path::new(MACOS_APP_CLI),
    )
    .ok()
}

/// [`find_cli`] with its inputs passed in, so tests need not touch the process environment.
fn locate(
    override_path: Option<OsString>,
    path_var: Option<OsString>,
    app_cli: &Path,
) -> Result<PathBuf> {
    // An explicit override that is wrong is an error, not a reason to quietly pick another binary.
    if let Some(p) = override_path.filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::NotInstalled(format!(
                "{CLI_ENV} is set to {}, which does not exist",
                p.display()
            )))
        };
    }
    let exe = format!("tailscale{}", std::env::consts::EXE_SUFFIX);
    if let Some(found) = path_var
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(&exe))
        .find(|p| is_executable(p))
    {
        return Ok(found);
    }
    if is_executable(app_cli) {
        return Ok(app_cli.to_path_buf());
    }
    Err(Error::NotInstalled(format!(
        "Tailscale is not installed (no `tailscale` on PATH, no {}): install it from \
         https://tailscale.com/download, or set {CLI_ENV} to the tailscale binary",
        app_cli.display()
    )))
}

#[cfg(unix)]
fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(p: &Path) -> bool {
    p.is_file()
}

/// The state of the local `tailscaled`, as `BackendState` in `tailscale status --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendState {
    /// `NoState`: the daemon has not loaded its state yet.
    NoState,
    /// `NeedsLogin`: not logged in to a tailnet.
    NeedsLogin,
    /// `NeedsMachineAuth`: logged in, waiting for an admin to approve the device.
    NeedsMachineAuth,
    /// `Stopped`: logged in, disconnected by the user (`tailscale down`).
    Stopped,
    /// `Starting`: connecting.
    Starting,
    /// `Running`: connected.
    Running,
    /// A state this version does not know, kept verbatim.
    Other(String),
}

impl BackendState {
    /// Tailscale's own spelling, as in the JSON.
    pub fn as_str(&self) -> &str {
        match self {
            Self::NoState => "NoState",
            Self::NeedsLogin => "NeedsLogin",
            Self::NeedsMachineAuth => "NeedsMachineAuth",
            Self::Stopped => "Stopped",
            Self::Starting => "Starting",
            Self::Running => "Running",
            Self::Other(s) => s,
        }
    }

    /// Words for a menu item ("needs login").
    pub fn describe(&self) -> &str {
        match self {
            Self::NoState => "not started",
            Self::NeedsLogin => "needs login",
            Self::NeedsMachineAuth => "waiting for approval",
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Other(s) => s,
        }
    }
}

impl From<&str> for BackendState {
    fn from(s: &str) -> Self {
        match s {
            "NoState" => Self::NoState,
            "NeedsLogin" => Self::NeedsLogin,
            "NeedsMachineAuth" => Self::NeedsMachineAuth,
            "Stopped" => Self::Stopped,
            "Starting" => Self::Starting,
            "Running" => Self::Running,
            other => Self::Other(other.to_string()),
        }
    }
}

// As Tailscale's string, so /health shows the same word `tailscale status --json` does.
impl Serialize for BackendState {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// What Jemma shows about this machine on the tailnet (tray menu, `/health`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The daemon's state.
    pub backend_state: BackendState,
    /// The Tailscale version (`Version`), when reported.
    pub version: Option<String>,
    /// This machine's name (`Self.HostName`).
    pub host_name: Option<String>,
    /// This machine's MagicDNS name without the trailing dot (`Self.DNSName`); `None` when logged out or
    /// MagicDNS is off.
    pub dns_name: Option<String>,
    /// This machine's tailnet addresses (`Self.TailscaleIPs`), IPv4 first as Tailscale lists them.
    pub ips: Vec<IpAddr>,
    /// The tailnet's name (`CurrentTailnet.Name`).
    pub tailnet: Option<String>,
    /// The tailnet's MagicDNS suffix (`MagicDNSSuffix`).
    pub magic_dns_suffix: Option<String>,
    /// Whether the coordination server sees this machine online (`Self.Online`).
    pub online: bool,
    /// The login URL while a login is in progress (`AuthURL`).
    pub auth_url: Option<String>,
    /// The other machines of the tailnet (`Peer`), by host name.
    pub peers: Vec<Peer>,
}

/// Another machine on the tailnet, as `tailscale status --json` lists it (where Jemma looks for other
/// Jemma nodes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    /// Its name (`HostName`).
    pub host_name: String,
    /// Its MagicDNS name without the trailing dot (`DNSName`), when MagicDNS is on.
    pub dns_name: Option<String>,
    /// Its tailnet addresses (`TailscaleIPs`), IPv4 first; entries that do not parse are left out.
    pub ips: Vec<IpAddr>,
    /// Whether the coordination server sees it online (`Online`).
    pub online: bool,
    /// Its operating system (`OS`: `macOS`, `linux`, `iOS`, …).
    pub os: Option<String>,
}

impl Peer {
    /// The first IPv4 address, else the first address.
    pub fn primary_ip(&self) -> Option<IpAddr> {
        first_ipv4(&self.ips)
    }

    /// `http://<its address>:<port>`: where a gateway listening on `port` there is reached over the
    /// tailnet (IPv6 in brackets). None without an address.
    pub fn url(&self, port: u16) -> Option<String> {
        Some(match self.primary_ip()? {
            IpAddr::V6(v6) => format!("http://[{v6}]:{port}"),
            v4 => format!("http://{v4}:{port}"),
        })
    }
}

/// The first IPv4 address of `ips`, else the first address (Tailscale lists IPv4 first; URLs read better
/// with it).
fn first_ipv4(ips: &[IpAddr]) -> Option<IpAddr> {
    ips.iter().find(|ip| ip.is_ipv4()).or(ips.first()).copied()
}

impl Status {
    /// (host name, `http://<address>:<port>`) of each online peer: where a gateway listening on `port`
    /// on it would be reached.
    pub fn online_peer_urls(&self, port: u16) -> Vec<(String, String)> {
        self.peers
            .iter()
            .filter(|p| p.online)
            .filter_map(|p| Some((p.host_name.clone(), p.url(port)?)))
            .collect()
    }

    /// Parses the output of `tailscale status --json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let raw: RawStatus = serde_json::from_str(json).map_err(|e| Error::Parse {
            cmd: "tailscale status --json".into(),
            message: e.to_string(),
        })?;
        let me = raw.self_node.unwrap_or_default();
        // Self.TailscaleIPs is the documented place; older versions only filled the top-level copy.
        let ips = me
            .tailscale_ips
            .filter(|v| !v.is_empty())
            .or(raw.tailscale_ips)
            .unwrap_or_default()
            .iter()
            .map(|s| {
                s.parse::<IpAddr>().map_err(|e| Error::Parse {
                    cmd: "tailscale status --json".into(),
                    message: format!("TailscaleIPs entry {s:?}: {e}"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let tailnet = raw.current_tailnet.unwrap_or_default();
        let mut peers: Vec<Peer> = raw
            .peer
            .unwrap_or_default()
            .into_values()
            .map(|p| Peer {
                host_name: p.host_name.unwrap_or_default(),
                dns_name: non_empty(p.dns_name.map(|d| d.trim_end_matches('.').to_string())),
                ips: p
                    .tailscale_ips
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|s| s.parse().ok())
                    .collect(),
                online: p.online.unwrap_or(false),
                os: non_empty(p.os),
            })
            .collect();
        peers.sort_by(|a, b| a.host_name.cmp(&b.host_name));
        Ok(Status {
            peers,
            backend_state: BackendState::from(raw.backend_state.as_str()),
            version: non_empty(raw.version),
            host_name: non_empty(me.host_name),
            // DNS names come fully qualified ("mac-mini.tail1234.ts.net."); URLs and certificates use them
            // without the root dot.
            dns_name: non_empty(me.dns_name.map(|d| d.trim_end_matches('.').to_string())),
            ips,
            tailnet: non_empty(tailnet.name),
            magic_dns_suffix: non_empty(raw.magic_dns_suffix.or(tailnet.magic_dns_suffix)),
            online: me.online.unwrap_or(false),
            auth_url: non_empty(raw.auth_url),
        })
    }

    /// Whether the daemon is connected to a tailnet.
    pub fn is_running(&self) -> bool {
        self.backend_state == BackendState::Running
    }

    /// The first IPv4 address, else the first address.
    pub fn primary_ip(&self) -> Option<IpAddr> {
        first_ipv4(&self.ips)
    }

    /// The URL `tailscale serve` makes this machine reachable at, when it has a MagicDNS name.
    pub fn https_url(&self) -> Option<String> {
        self.dns_name.as_ref().map(|d| format!("https://{d}"))
    }

    /// One line for a menu item: `Tailscale: running · mac-mini.tail1234.ts.net (100.75.223.113)`.
    pub fn summary(&self) -> String {
        let mut s = format!("Tailscale: {}", self.backend_state);
        if self.is_running() && !self.online {
            s.push_str(", offline");
        }
        // Names and addresses only mean something while connected; a stopped node still reports its old
        // ones, which would suggest it is reachable there.
        if self.is_running() {
            let name = self.dns_name.as_deref().or(self.host_name.as_deref());
            match (name, self.primary_ip()) {
                (Some(n), Some(ip)) => s.push_str(&format!(" · {n} ({ip})")),
                (Some(n), None) => s.push_str(&format!(" · {n}")),
                (None, Some(ip)) => s.push_str(&format!(" · {ip}")),
                (None, None) => {}
            }
        }
        s
    }
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// The subset of `ipnstate.Status` Jemma reads; unknown fields are ignored so new CLI versions parse.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawStatus {
    backend_state: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default, rename = "AuthURL")]
    auth_url: Option<String>,
    #[serde(default, rename = "TailscaleIPs")]
    tailscale_ips: Option<Vec<String>>,
    #[serde(default, rename = "Self")]
    self_node: Option<RawNode>,
    #[serde(default, rename = "MagicDNSSuffix")]
    magic_dns_suffix: Option<String>,
    #[serde(default)]
    current_tailnet: Option<RawTailnet>,
    /// Keyed by node key.
    #[serde(default)]
    peer: Option<std::collections::BTreeMap<String, RawNode>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawNode {
    #[serde(default)]
    host_name: Option<String>,
    #[serde(default, rename = "DNSName")]
    dns_name: Option<String>,
    #[serde(default, rename = "TailscaleIPs")]
    tailscale_ips: Option<Vec<String>>,
    #[serde(default)]
    online: Option<bool>,
    #[serde(default, rename = "OS")]
    os: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawTailnet {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "MagicDNSSuffix")]
    magic_dns_suffix: Option<String>,
}

/// Where the gateway is reachable after [`Tailscale::expose`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServeInfo {
    /// `https://<MagicDNS name>`, valid from any device on the tailnet.
    pub url: String,
    /// The MagicDNS name the certificate is for.
    pub dns_name: String,
    /// The local port being proxied to.
    pub port: u16,
}

/// Whether a `tailscale serve status --json` document proxies anything to `127.0.0.1:<port>` or
/// `localhost:<port>`.
///
/// Lenient with shapes, since the serve config has changed across releases: it looks at `TCP.*.TCPForward`,
/// `Web.*.Handlers.*.Proxy`, and recurses into `Services` and `Foreground` (sessions started without
/// `--bg`); anything else is ignored. Empty output (nothing served, on some versions) is `false`.
pub fn serve_status_exposes(json: &str, port: u16) -> Result<bool> {
    if json.trim().is_empty() {
        return Ok(false);
    }
    let v: Value = serde_json::from_str(json).map_err(|e| Error::Parse {
        cmd: "tailscale serve status --json".into(),
        message: e.to_string(),
    })?;
    if !v.is_object() && !v.is_null() {
        return Err(Error::Parse {
            cmd: "tailscale serve status --json".into(),
            message: "expected a JSON object".into(),
        });
    }
    Ok(config_proxies_to(&v, port))
}

fn config_proxies_to(config: &Value, port: u16) -> bool {
    let values = |key: &str| {
        config
            .get(key)
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|m| m.values())
    };
    let tcp = values("TCP").any(|h| {
        h.get("TCPForward")
            .and_then(Value::as_str)
            .is_some_and(|t| target_is_local_port(t, port))
    });
    let web = values("Web").any(|site| {
        site.get("Handlers")
            .and_then(Value::as_object)
            .is_some_and(|hs| {
                hs.values().any(|h| {
                    h.get("Proxy")
                        .and_then(Value::as_str)
                        .is_some_and(|t| target_is_local_port(t, port))
                })
            })
    });
    tcp || web
        || values("Services").any(|c| config_proxies_to(c, port))
        || values("Foreground").any(|c| config_proxies_to(c, port))
}

/// `http://127.0.0.1:8080`, `localhost:8080/v1`, `8080` (the CLI's shorthand) and `[::1]:8080` all count.
fn target_is_local_port(target: &str, port: u16) -> bool {
    let (scheme, rest) = match target.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, target),
    };
    let hostport = rest.split('/').next().unwrap_or("");
    if let Ok(p) = hostport.parse::<u16>() {
        return p == port;
    }
    let (host, p) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') => (h, p.parse::<u16>().ok()),
        _ => (hostport, None),
    };
    let p = p.or(match scheme {
        Some("http") => Some(80),
        Some("https" | "https+insecure") => Some(443),
        _ => None,
    });
    matches!(host, "127.0.0.1" | "localhost" | "[::1]") && p == Some(port)
}

/// A handle on the `tailscale` CLI.
#[derive(Debug, Clone)]
pub struct Tailscale {
    cli: PathBuf,
    timeout: Duration,
}

impl Tailscale {
    /// Uses the CLI at `cli`. Nothing is checked until a command runs; a missing file is then
    /// [`Error::NotInstalled`].
    pub fn new(cli: impl Into<PathBuf>) -> Self {
        Self {
            cli: cli.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Finds the CLI as [`find_cli`] does, with a message saying how to install it when it is missing.
    pub fn detect() -> Result<Self> {
        locate(
            std::env::var_os(CLI_ENV),
            std::env::var_os("PATH"),
            Path::new(MACOS_APP_CLI),
        )
        .map(Self::new)
    }

    /// Replaces the per-command time limit ([`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The CLI this handle runs.
    pub fn cli(&self) -> &Path {
        &self.cli
    }

    /// `tailscale status --json`, parsed.
    pub async fn status(&self) -> Result<Status> {
        Status::from_json(&self.run(&["status", "--json"]).await?)
    }

    /// Serves `http://127.0.0.1:<port>` on the tailnet over HTTPS (443) with
    /// `tailscale serve --bg --https=443 http://127.0.0.1:<port>`, and returns the URL.
    ///
    /// `--bg` makes the config persistent: it survives Jemma quitting and reboots until [`Self::unexpose`].
    /// The gateway must be bound to 127.0.0.1 (or all interfaces) for the proxy to reach it. Checks the
    /// status first so a disconnected or MagicDNS-less tailnet gives an actionable error instead of the
    /// CLI's.
    pub async fn expose(&self, port: u16) -> Result<ServeInfo> {
        let status = self.status().await?;
        if !status.is_running() {
            return Err(Error::Unavailable(format!(
                "Tailscale is {}: connect this Mac to a tailnet (Tailscale app, or `tailscale up`) before \
                 exposing Jemma",
                status.backend_state
            )));
        }
        let Some(dns_name) = status.dns_name else {
            return Err(Error::Unavailable(
                "this machine has no MagicDNS name: enable MagicDNS and HTTPS certificates on the DNS page \
                 of the Tailscale admin console"
                    .into(),
            ));
        };
        let target = format!("http://127.0.0.1:{port}");
        let https = format!("--https={HTTPS_PORT}");
        self.run(&["serve", "--bg", &https, &target]).await?;
        Ok(ServeInfo {
            url: format!("https://{dns_name}"),
            dns_name,
            port,
        })
    }

    /// Stops serving HTTPS on 443: `tailscale serve --https=443 off`.
    pub async fn unexpose(&self) -> Result<()> {
        let https = format!("--https={HTTPS_PORT}");
        self.run(&["serve", &https, "off"]).await.map(drop)
    }

    /// Whether `tailscale serve status --json` shows a handler proxying to this port on localhost.
    pub async fn is_exposed(&self, port: u16) -> Result<bool> {
        serve_status_exposes(&self.run(&["serve", "status", "--json"]).await?, port)
    }

    /// Runs the CLI with `args` under the time limit; returns stdout on success.
    async fn run(&self, args: &[&str]) -> Result<String> {
        let cmd = std::iter::once(self.cli.display().to_string())
            .chain(args.iter().map(|a| a.to_string()))
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = tokio::process::Command::new(&self.cli)
            .args(args)
            // Never let the CLI wait on a prompt.
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NotInstalled(format!(
                    "Tailscale CLI not found at {}: install Tailscale from https://tailscale.com/download, \
                     or set {CLI_ENV}",
                    self.cli.display()
                )),
                _ => Error::Io {
                    cmd: cmd.clone(),
                    source: e,
                },
            })?;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let waited = {
            // The pipes are drained while the CLI runs: a large `status --json` (many peers) would
            // otherwise fill a pipe and block it until the time limit.
            let reads = async {
                tokio::join!(drain(stdout, &mut out), drain(stderr, &mut err));
            };
            tokio::pin!(reads);
            let mut read_all = false;
            let waited = tokio::time::timeout(self.timeout, async {
                tokio::select! {
                    status = child.wait() => status,
                    () = &mut reads => {
                        read_all = true;
                        child.wait().await
                    }
                }
            })
            .await;
            // It exited in time; its pipes close with it unless a grandchild still holds them, which
            // gets a moment past the limit: the command itself did finish.
            if matches!(waited, Ok(Ok(_))) && !read_all {
                let _ = tokio::time::timeout(PIPE_GRACE, reads).await;
            }
            waited
        };
        // What the CLI said: its stderr, trimmed, else its stdout.
        let said = || {
            [&err, &out]
                .into_iter()
                .map(|b| String::from_utf8_lossy(b).trim().to_string())
                .find(|o| !o.is_empty())
                .unwrap_or_default()
        };
        let status = match waited {
            Ok(Ok(status)) => status,
            Err(_elapsed) => {
                let _ = child.kill().await;
                return Err(Error::Timeout {
                    cmd,
                    after: self.timeout,
                    output: said(),
                });
            }
            Ok(Err(source)) => {
                let _ = child.kill().await;
                return Err(Error::Io { cmd, source });
            }
        };
        if status.success() {
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        Err(Error::Command {
            cmd,
            code: status.code(),
            stderr: said(),
        })
    }
}

/// How long a CLI that has exited may keep its pipes open (a grandchild holding them) before its output
/// is taken as it stands.
const PIPE_GRACE: Duration = Duration::from_millis(200);

/// Appends everything `pipe` yields to `buf` until it closes or fails. Cancel-safe: each read is appended
/// before the next await, so a caller that gives up keeps what came.
async fn drain(pipe: Option<impl tokio::io::AsyncRead + Unpin>, buf: &mut Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let Some(mut pipe) = pipe else { return };
    let mut chunk = [0u8; 8192];
    while let Ok(n @ 1..) = pipe.read(&mut chunk).await {
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_wins_and_a_missing_override_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cli = dir.path().join("ts");
        std::fs::write(&cli, "").unwrap();
        let found = locate(Some(cli.clone().into()), None, Path::new("/nonexistent")).unwrap();
        assert_eq!(found, cli);

        let missing = dir.path().join("nope");
        let err = locate(Some(missing.into()), None, Path::new("/nonexistent")).unwrap_err();
        assert!(
            matches!(&err, Error::NotInstalled(m) if m.contains(CLI_ENV)),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn path_search_needs_an_executable_then_falls_back_to_the_app_bundle() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let ts = bin.join("tailscale");
        std::fs::write(&ts, "#!/bin/sh\n").unwrap();
        let app = dir.path().join("Tailscale");
        std::fs::write(&app, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([dir.path().join("empty"), bin.clone()]).unwrap();

        // Not executable yet: skipped in favour of the app bundle.
        assert_eq!(locate(None, Some(path.clone()), &app).unwrap(), app);
        std::fs::set_permissions(&ts, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(locate(None, Some(path), &app).unwrap(), ts);
        // An empty override counts as unset.
        assert_eq!(locate(Some("".into()), None, &app).unwrap(), app);

        let err = locate(None, None, &dir.path().join("missing")).unwrap_err();
        assert!(
            matches!(&err, Error::NotInstalled(m) if m.contains("tailscale.com/download")),
            "{err}"
        );
    }

    #[test]
    fn local_targets() {
        for t in [
            "http://127.0.0.1:8080",
            "http://localhost:8080/",
            "127.0.0.1:8080",
            "localhost:8080",
            "8080",
            "http://[::1]:8080/v1",
        ] {
            assert!(target_is_local_port(t, 8080), "{t}");
        }
        for t in [
            "http://127.0.0.1:8081",
            "http://10.0.0.2:8080",
            "https://example.com:8080",
            "http://127.0.0.1",
            "",
            "text:hello",
        ] {
            assert!(!target_is_local_port(t, 8080), "{t}");
        }
        assert!(target_is_local_port("http://127.0.0.1", 80));
    }
}
