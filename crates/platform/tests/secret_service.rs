//! The keychain for real (no mock): a separate test binary, so the mock store the unit tests install never
//! applies here.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use jemma_platform::secrets::{Secrets, resolve};

/// Round trip through the OS keychain: set, read back through a new entry (which the mock cannot do),
/// resolve a `SERVICE/ACCOUNT` reference, clear with an empty value, delete twice.
///
/// Ignored by default because it needs a keychain. On Linux, run it in a throwaway D-Bus session with a
/// gnome-keyring whose login keyring lives in a temporary `XDG_DATA_HOME`, so the user's real keyring is
/// never touched. The password must be non-empty: with an empty one gnome-keyring creates no login
/// collection and every call fails with "no result found".
///
/// ```sh
/// dbus-run-session -- sh -c 'export XDG_DATA_HOME="$(mktemp -d)"; \
///   printf jemma | gnome-keyring-daemon --unlock --components=secrets >/dev/null \
///   && cargo test -j1 -p jemma-platform --test secret_service -- --ignored'
/// ```
///
/// On macOS, `cargo test -p jemma-platform --test secret_service -- --ignored` uses the login keychain
/// (service `ai.jemma.test`) and cleans up after itself.
#[test]
#[ignore = "needs a real keychain; see the doc comment for the dbus-run-session command"]
fn real_keychain_round_trip() {
    let service = "ai.jemma.test";
    let name = format!("e2e_{}", std::process::id());
    let secrets = Secrets::new(service);
    secrets.delete(&name).unwrap();

    assert_eq!(secrets.get(&name).unwrap(), None);
    assert!(!secrets.is_set(&name));

    secrets.set(&name, "sk-test-Ωmega & <value>").unwrap();
    assert_eq!(
        secrets.get(&name).unwrap().as_deref(),
        Some("sk-test-Ωmega & <value>")
    );
    assert!(secrets.is_set(&name));
    assert_eq!(
        resolve(&format!("{service}/{name}")).as_deref(),
        Some("sk-test-Ωmega & <value>")
    );

    secrets.set(&name, "replaced").unwrap();
    assert_eq!(secrets.get(&name).unwrap().as_deref(), Some("replaced"));

    secrets.set(&name, "").unwrap();
    assert_eq!(secrets.get(&name).unwrap(), None);
    assert_eq!(resolve(&format!("{service}/{name}")), None);
    secrets.delete(&name).unwrap();
    secrets.delete(&name).unwrap();
}
