//! The LaunchAgent template, parsed as a plist both raw and rendered.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::path::Path;

use jemma_platform::launchd::{label, render_plist, template};
use plist::{Dictionary, Value};

fn parse(xml: &str) -> Dictionary {
    Value::from_reader_xml(xml.as_bytes())
        .expect("valid plist XML")
        .into_dictionary()
        .expect("a top-level dict")
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_string().expect("string"))
        .collect()
}

/// The keys both forms share: everything but the placeholders.
fn assert_common(d: &Dictionary) {
    assert_eq!(d["Label"].as_string(), Some(label()));
    assert_eq!(d["RunAtLoad"].as_boolean(), Some(true));
    let keep_alive = d["KeepAlive"].as_dictionary().expect("KeepAlive dict");
    assert_eq!(keep_alive["SuccessfulExit"].as_boolean(), Some(false));
    assert_eq!(keep_alive.len(), 1);
    assert_eq!(d["ThrottleInterval"].as_unsigned_integer(), Some(10));
    assert_eq!(d["ProcessType"].as_string(), Some("Interactive"));
    let env = d["EnvironmentVariables"]
        .as_dictionary()
        .expect("EnvironmentVariables dict");
    assert_eq!(env["JEMMA_LOG"].as_string(), Some("info"));
    let path = env["PATH"].as_string().unwrap();
    assert!(path.split(':').any(|p| p == "/opt/homebrew/bin"), "{path}");
    assert!(path.split(':').any(|p| p == "/usr/bin"), "{path}");
}

#[test]
fn raw_template_is_a_valid_plist_with_placeholders() {
    let d = parse(template());
    assert_common(&d);
    assert_eq!(
        strings(&d["ProgramArguments"]),
        ["__JEMMA_BIN__", "serve", "--config", "__JEMMA_CONFIG__"]
    );
    assert_eq!(
        d["StandardOutPath"].as_string(),
        Some("__LOG_DIR__/gateway.log")
    );
    assert_eq!(
        d["StandardErrorPath"].as_string(),
        Some("__LOG_DIR__/gateway.err.log")
    );
    assert_eq!(
        d["WorkingDirectory"].as_string(),
        Some("__JEMMA_CONFIG_DIR__")
    );
    // The shipped file and the compiled-in copy are the same file.
    let on_disk = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../launchd/ai.jemma.gateway.plist"),
    )
    .unwrap();
    assert_eq!(on_disk, template());
}

#[test]
fn rendered_plist() {
    let xml = render_plist(
        Path::new("/opt/homebrew/bin/jemma"),
        Path::new("/Users/alice/.config/jemma/jemma.toml"),
        Path::new("/Users/alice/Library/Logs/Jemma/"),
    )
    .unwrap();
    assert!(!xml.contains("__"), "placeholder left:\n{xml}");
    let d = parse(&xml);
    assert_common(&d);
    assert_eq!(
        strings(&d["ProgramArguments"]),
        [
            "/opt/homebrew/bin/jemma",
            "serve",
            "--config",
            "/Users/alice/.config/jemma/jemma.toml"
        ]
    );
    assert_eq!(
        d["StandardOutPath"].as_string(),
        Some("/Users/alice/Library/Logs/Jemma/gateway.log")
    );
    assert_eq!(
        d["StandardErrorPath"].as_string(),
        Some("/Users/alice/Library/Logs/Jemma/gateway.err.log")
    );
    assert_eq!(
        d["WorkingDirectory"].as_string(),
        Some("/Users/alice/.config/jemma")
    );
}

#[test]
fn rendered_paths_are_xml_escaped() {
    let bin = "/Users/a&b <c>/\"q\" 'jemma'/bin/jemma";
    let config = "/Users/a&b <c>/My Config/jemma.toml";
    let logs = "/Users/a&b <c>/Logs";
    let xml = render_plist(Path::new(bin), Path::new(config), Path::new(logs)).unwrap();
    let d = parse(&xml);
    assert_eq!(
        strings(&d["ProgramArguments"]),
        [bin, "serve", "--config", config]
    );
    assert_eq!(
        d["StandardOutPath"].as_string(),
        Some("/Users/a&b <c>/Logs/gateway.log")
    );
    assert_eq!(
        d["WorkingDirectory"].as_string(),
        Some("/Users/a&b <c>/My Config")
    );
}

/// `scripts/launchd-install.sh --print` renders with sed what `render_plist` renders in Rust; the two must
/// agree byte for byte, special characters included.
#[cfg(unix)]
#[test]
fn install_script_renders_like_render_plist() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("a&b <c> 'q' \"d\" |x\\y");
    let bin = root.join("bin/jemma");
    let config = root.join("My Config/jemma.toml");
    let logs = root.join("Logs");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&bin, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(&config, "").unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/launchd-install.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--print")
        .arg("--bin")
        .arg(&bin)
        .arg("--config")
        .arg(&config)
        .arg("--log-dir")
        .arg(&logs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_script = String::from_utf8(out.stdout).unwrap();
    let from_rust = render_plist(&bin, &config, &logs).unwrap();
    assert_eq!(from_script, from_rust);
    assert_eq!(
        strings(&parse(&from_script)["ProgramArguments"])[0],
        bin.to_str().unwrap()
    );
}

/// Installing for real refuses off macOS, with a message saying why.
#[cfg(target_os = "linux")]
#[test]
fn install_scripts_refuse_off_macos() {
    use std::process::Command;
    for name in ["launchd-install.sh", "launchd-uninstall.sh"] {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../scripts")
            .join(name);
        let out = Command::new("bash")
            .arg(&script)
            .args(["--config", "/nonexistent.toml"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("only on macOS"), "{name}: {stderr}");
    }
}
