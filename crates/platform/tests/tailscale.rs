//! Tailscale: parsing recorded `tailscale status --json` / `tailscale serve status --json` output, and the
//! process layer against a scripted stand-in for the CLI (a `#!/bin/sh` script, hence Unix only).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test
#![cfg(unix)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

use jemma_platform::Error;
use jemma_platform::tailscale::{BackendState, Status, Tailscale, serve_status_exposes};

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---- status parsing -------------------------------------------------------------------------------------

#[test]
fn running_status() {
    let s = Status::from_json(&fixture("status-running.json")).unwrap();
    assert_eq!(s.backend_state, BackendState::Running);
    assert!(s.is_running());
    assert!(s.online);
    assert_eq!(s.host_name.as_deref(), Some("mac-mini"));
    assert_eq!(s.dns_name.as_deref(), Some("mac-mini.tail1234.ts.net"));
    assert_eq!(
        s.ips,
        vec![
            "100.75.223.113".parse::<IpAddr>().unwrap(),
            "fd7a:115c:a1e0::6a01:df71".parse().unwrap()
        ]
    );
    assert_eq!(s.tailnet.as_deref(), Some("alice@example.com"));
    assert_eq!(s.magic_dns_suffix.as_deref(), Some("tail1234.ts.net"));
    assert_eq!(s.version.as_deref(), Some("1.82.5-tdec88625e-gec2eb9730"));
    assert_eq!(s.auth_url, None);
    assert_eq!(
        s.https_url().as_deref(),
        Some("https://mac-mini.tail1234.ts.net")
    );
    assert_eq!(
        s.summary(),
        "Tailscale: running · mac-mini.tail1234.ts.net (100.75.223.113)"
    );

    // What the tray and /health get.
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["backend_state"], "Running");
    assert_eq!(
        json["ips"],
        serde_json::json!(["100.75.223.113", "fd7a:115c:a1e0::6a01:df71"])
    );
    assert_eq!(json["dns_name"], "mac-mini.tail1234.ts.net");
    assert_eq!(json["online"], true);

    // The other machines, where Jemma looks for other Jemma nodes.
    let names: Vec<&str> = s.peers.iter().map(|p| p.host_name.as_str()).collect();
    assert_eq!(names, ["alices-iphone", "build-box"]);
    let b = &s.peers[1];
    assert_eq!(b.dns_name.as_deref(), Some("build-box.tail1234.ts.net"));
    assert_eq!(b.primary_ip(), Some("100.88.12.54".parse().unwrap()));
    assert!(b.online);
    assert_eq!(b.os.as_deref(), Some("linux"));
}

#[test]
fn needs_login_status() {
    let s = Status::from_json(&fixture("status-needslogin.json")).unwrap();
    assert_eq!(s.backend_state, BackendState::NeedsLogin);
    assert!(!s.is_running());
    assert!(!s.online);
    assert_eq!(s.host_name.as_deref(), Some("mac-mini"));
    assert_eq!(s.dns_name, None, "empty DNSName is no name");
    assert!(s.ips.is_empty());
    assert_eq!(s.tailnet, None);
    assert_eq!(s.magic_dns_suffix, None);
    assert_eq!(
        s.auth_url.as_deref(),
        Some("https://login.tailscale.com/a/1a2b3c4d5e6f7")
    );
    assert_eq!(s.https_url(), None);
    assert_eq!(s.summary(), "Tailscale: needs login");
    assert_eq!(
        serde_json::to_value(&s).unwrap()["backend_state"],
        "NeedsLogin"
    );
}

#[test]
fn stopped_status() {
    let s = Status::from_json(&fixture("status-stopped.json")).unwrap();
    assert_eq!(s.backend_state, BackendState::Stopped);
    assert!(!s.online);
    // A stopped node keeps its name and addresses, but the summary must not suggest it is reachable.
    assert_eq!(s.dns_name.as_deref(), Some("mac-mini.tail1234.ts.net"));
    assert_eq!(s.ips.len(), 2);
    assert_eq!(s.summary(), "Tailscale: stopped");
}

#[test]
fn lenient_and_strict_parts_of_status() {
    // Minimal documents: only BackendState is required; Self missing; top-level IPs as fallback.
    let s = Status::from_json(
        r#"{"BackendState":"Running","TailscaleIPs":["100.64.0.1"],"Self":{"HostName":"box","Online":false}}"#,
    )
    .unwrap();
    assert_eq!(s.ips, vec!["100.64.0.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        s.summary(),
        "Tailscale: running, offline · box (100.64.0.1)"
    );

    let s = Status::from_json(r#"{"BackendState":"Starting"}"#).unwrap();
    assert_eq!(s.summary(), "Tailscale: starting");
    let s = Status::from_json(r#"{"BackendState":"InUseOtherUser"}"#).unwrap();
    assert_eq!(
        s.backend_state,
        BackendState::Other("InUseOtherUser".into())
    );
    assert_eq!(
        serde_json::to_value(&s).unwrap()["backend_state"],
        "InUseOtherUser"
    );

    for bad in [
        "",
        "not json",
        "{}",
        r#"{"BackendState":7}"#,
        r#"{"BackendState":"Running","Self":{"TailscaleIPs":["300.1.1.1"]}}"#,
    ] {
        let err = Status::from_json(bad).unwrap_err();
        assert!(
            matches!(&err, Error::Parse { cmd, .. } if cmd == "tailscale status --json"),
            "{bad:?}: {err}"
        );
    }
}

// ---- serve status parsing -------------------------------------------------------------------------------

#[test]
fn serve_status_shapes() {
    let exposed = fixture("serve-status-exposed.json");
    assert!(serve_status_exposes(&exposed, 8080).unwrap());
    assert!(!serve_status_exposes(&exposed, 8081).unwrap());

    // Served without --bg: the config sits under Foreground.<session>.
    assert!(serve_status_exposes(&fixture("serve-status-foreground.json"), 8080).unwrap());

    let other = fixture("serve-status-other.json");
    assert!(!serve_status_exposes(&other, 8080).unwrap());
    assert!(serve_status_exposes(&other, 3000).unwrap());
    assert!(
        serve_status_exposes(&other, 5432).unwrap(),
        "TCPForward counts"
    );

    assert!(!serve_status_exposes(&fixture("serve-status-empty.json"), 8080).unwrap());
    assert!(!serve_status_exposes("", 8080).unwrap());
    assert!(!serve_status_exposes("null", 8080).unwrap());
    // Unexpected value types inside known keys are ignored, not fatal.
    assert!(!serve_status_exposes(r#"{"TCP":[],"Web":{"x":{"Handlers":5}}}"#, 8080).unwrap());
    // Services (tailscale serve --service) have the same shape one level down.
    assert!(
        serve_status_exposes(
            r#"{"Services":{"svc:jemma":{"Web":{"jemma.tail1234.ts.net:443":{"Handlers":{"/":{"Proxy":"http://127.0.0.1:8080"}}}}}}}"#,
            8080
        )
        .unwrap()
    );

    for bad in ["No serve config", "[]", "\"x\""] {
        assert!(
            matches!(serve_status_exposes(bad, 8080), Err(Error::Parse { .. })),
            "{bad:?}"
        );
    }
}

// ---- the process layer, with a scripted CLI -------------------------------------------------------------

/// Test processes fork concurrently; a script still open for writing in one thread while another thread
/// forks can make its exec fail with ETXTBSY. Scripted tests therefore run one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

struct FakeCli {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl FakeCli {
    /// A `#!/bin/sh` stand-in that appends its arguments (each in brackets, one call per line) to `args`
    /// and then runs `body`. `$D` in the body is the directory holding the fixtures copied there.
    fn new(body: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "status-running.json",
            "status-needslogin.json",
            "serve-status-exposed.json",
        ] {
            std::fs::write(dir.path().join(f), fixture(f)).unwrap();
        }
        let path = dir.path().join("tailscale");
        let script = format!(
            "#!/bin/sh\nD='{}'\nfor a in \"$@\"; do printf '[%s]' \"$a\"; done >> \"$D/args\"\necho >> \"$D/args\"\n{body}\n",
            dir.path().display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        FakeCli { dir, path }
    }

    fn tailscale(&self) -> Tailscale {
        Tailscale::new(&self.path)
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("args"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Behaves like a connected `tailscale` on mac-mini.tail1234.ts.net.
const CONNECTED: &str = r#"case "$1 $2" in
  "status --json") cat "$D/status-running.json" ;;
  "serve status") cat "$D/serve-status-exposed.json" ;;
  "serve --bg")
    printf 'Available within your tailnet:\n\nhttps://mac-mini.tail1234.ts.net/\n|-- proxy %s\n\nServe started and running in the background.\nTo disable the proxy, run: tailscale serve --https=443 off\n' "$4" ;;
  "serve --https=443") ;;
  *) echo "unexpected: $*" >&2; exit 2 ;;
esac"#;

#[tokio::test]
async fn expose_runs_serve_with_exact_arguments_and_returns_the_url() {
    let _serial = SERIAL.lock().await;
    let cli = FakeCli::new(CONNECTED);
    let info = cli.tailscale().expose(8080).await.unwrap();
    assert_eq!(info.url, "https://mac-mini.tail1234.ts.net");
    assert_eq!(info.dns_name, "mac-mini.tail1234.ts.net");
    assert_eq!(info.port, 8080);
    assert_eq!(
        cli.calls(),
        [
            "[status][--json]",
            "[serve][--bg][--https=443][http://127.0.0.1:8080]"
        ]
    );
}

#[tokio::test]
async fn unexpose_and_is_exposed_arguments() {
    let _serial = SERIAL.lock().await;
    let cli = FakeCli::new(CONNECTED);
    let ts = cli.tailscale();
    ts.unexpose().await.unwrap();
    assert!(ts.is_exposed(8080).await.unwrap());
    assert!(!ts.is_exposed(9000).await.unwrap());
    assert_eq!(
        cli.calls(),
        [
            "[serve][--https=443][off]",
            "[serve][status][--json]",
            "[serve][status][--json]"
        ]
    );
    let status = ts.status().await.unwrap();
    assert_eq!(
        status.summary(),
        "Tailscale: running · mac-mini.tail1234.ts.net (100.75.223.113)"
    );
}

#[tokio::test]
async fn expose_refuses_when_not_connected_without_running_serve() {
    let _serial = SERIAL.lock().await;
    let cli = FakeCli::new(r#"cat "$D/status-needslogin.json""#);
    let err = cli.tailscale().expose(8080).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable(m) if m.contains("needs login")),
        "{err}"
    );
    assert_eq!(cli.calls(), ["[status][--json]"]);
}

#[tokio::test]
async fn non_zero_exit_surfaces_trimmed_stderr() {
    let _serial = SERIAL.lock().await;
    let cli = FakeCli::new(
        r#"case "$1" in
  status) cat "$D/status-running.json" ;;
  *) echo "ignored stdout"; printf '\n  serve: HTTPS is not enabled for this tailnet  \n\n' >&2; exit 1 ;;
esac"#,
    );
    let err = cli.tailscale().expose(8080).await.unwrap_err();
    match &err {
        Error::Command { cmd, code, stderr } => {
            assert!(
                cmd.ends_with("tailscale serve --bg --https=443 http://127.0.0.1:8080"),
                "{cmd}"
            );
            assert_eq!(*code, Some(1));
            assert_eq!(stderr, "serve: HTTPS is not enabled for this tailnet");
        }
        other => panic!("expected Command, got {other:?}"),
    }
    assert!(err.to_string().contains("exit code 1"), "{err}");
}

#[tokio::test]
async fn failure_with_only_stdout_reports_stdout_and_signals_have_no_code() {
    let _serial = SERIAL.lock().await;
    let cli = FakeCli::new("echo 'failed to connect to local tailscaled'; exit 3");
    match cli.tailscale().status().await.unwrap_err() {
        Error::Command { code, stderr, .. } => {
            assert_eq!(code, Some(3));
            assert_eq!(stderr, "failed to connect to local tailscaled");
        }
        other => panic!("expected Command, got {other:?}"),
    }

    let cli = FakeCli::new("kill -9 $$");
    let err = cli.tailscale().unexpose().await.unwrap_err();
    assert!(matches!(&err, Error::Command { code: None, .. }), "{err:?}");
    assert!(err.to_string().contains("killed by a signal"), "{err}");
}

#[tokio::test]
async fn unparseable_output_is_a_parse_error() {
    let _serial = SERIAL.lock().await;
    let cli = FakeCli::new("echo 'Tailscale is starting...'");
    let ts = cli.tailscale();
    assert!(matches!(ts.status().await, Err(Error::Parse { .. })));
    assert!(matches!(
        ts.is_exposed(8080).await,
        Err(Error::Parse { .. })
    ));
}

#[tokio::test]
async fn timeout_kills_the_command_and_keeps_its_output() {
    let _serial = SERIAL.lock().await;
    // What `tailscale serve` does on a tailnet without HTTPS: print a link and wait.
    let cli = FakeCli::new(
        "echo 'Serve is not enabled on your tailnet.'\necho 'To enable, visit: https://login.tailscale.com/f/serve?node=nXk4Lq7CNTRL'\nsleep 5",
    );
    let ts = cli.tailscale().with_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let err = ts.status().await.unwrap_err();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "returned after {took:?}");
    match &err {
        Error::Timeout { cmd, after, output } => {
            assert!(cmd.ends_with("tailscale status --json"), "{cmd}");
            assert_eq!(*after, Duration::from_millis(300));
            assert!(
                output.contains("https://login.tailscale.com/f/serve?node=nXk4Lq7CNTRL"),
                "{output}"
            );
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn large_output_does_not_block_the_cli() {
    let _serial = SERIAL.lock().await;
    // ~1 MB on stdout and stderr each: well past a pipe buffer, so the CLI would stall if nothing drained.
    let cli = FakeCli::new(
        r#"printf '{"BackendState":"Running","Padding":"'
i=0; while [ $i -lt 16384 ]; do printf '%064d' 0; i=$((i+1)); done
i=0; while [ $i -lt 16384 ]; do printf '%064d' 0 >&2; i=$((i+1)); done
printf '"}'"#,
    );
    let s = cli
        .tailscale()
        .with_timeout(Duration::from_secs(30))
        .status()
        .await
        .unwrap();
    assert_eq!(s.backend_state, BackendState::Running);
}

#[tokio::test]
async fn missing_cli_is_not_installed() {
    let dir = tempfile::tempdir().unwrap();
    let ts = Tailscale::new(dir.path().join("no-such-tailscale"));
    for err in [
        ts.status().await.unwrap_err(),
        ts.expose(8080).await.unwrap_err(),
        ts.unexpose().await.unwrap_err(),
        ts.is_exposed(8080).await.unwrap_err(),
    ] {
        assert!(
            matches!(&err, Error::NotInstalled(m) if m.contains("no-such-tailscale")),
            "{err:?}"
        );
    }
}
