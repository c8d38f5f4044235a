//! API keys and tokens in the OS keychain (macOS Keychain, Secret Service on Linux, Windows Credential
//! Manager) through the `keyring` crate, so they stay out of config files, shell history and backups.
//!
//! Entries are generic passwords with service [`SERVICE`] (`ai.jemma`) and the secret's name as the account,
//! so they can be inspected or removed with Keychain Access or `security find-generic-password -s ai.jemma`.
//! Config files refer to them as `keyring:ai.jemma/heavy_api_key`; the router passes the part after
//! `keyring:` to [`resolve`].
//!
//! Values are never logged and never put into errors; this module returns them only from [`Secrets::get`]
//! and [`resolve`].

use keyring::Entry;

use crate::{Error, Result};

/// The keychain service Jemma's own secrets live under.
pub const SERVICE: &str = "ai.jemma";

/// Longest accepted secret name.
const MAX_NAME: usize = 64;

/// Checks a secret name: 1 to 64 characters from `a-z`, `0-9` and `_` (`heavy_api_key`, `hf_token`).
///
/// Narrow on purpose: names appear in config references, menu items and keychain UIs, and a fixed alphabet
/// keeps `SERVICE/ACCOUNT` references unambiguous and every backend's attribute limits out of reach.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidSecretName(name.to_string()))
    }
}

/// Named secrets under one keychain service.
///
/// Holds no secret values, so the derived `Debug` prints only the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secrets {
    service: String,
}

impl Default for Secrets {
    fn default() -> Self {
        Self::new(SERVICE)
    }
}

impl Secrets {
    /// Secrets under `service`; Jemma uses [`SERVICE`] (`Secrets::new("ai.jemma")`).
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
        }
    }

    /// The keychain service.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The secret's value, or `None` when it is not set.
    pub fn get(&self, name: &str) -> Result<Option<String>> {
        read(&self.entry(name)?, name)
    }

    /// Stores `value` under `name`, replacing any previous one. An empty value deletes the secret, so a
    /// cleared settings field removes the key rather than storing "".
    pub fn set(&self, name: &str, value: &str) -> Result<()> {
        write(&self.entry(name)?, name, value)
    }

    /// Removes the secret; removing one that is not set succeeds.
    pub fn delete(&self, name: &str) -> Result<()> {
        remove(&self.entry(name)?, name)
    }

    /// Whether the secret is set. Keychain errors count as "not set" (and are logged, without the value):
    /// this feeds settings checkmarks, where an error has nowhere better to go; use [`Self::get`] to see it.
    pub fn is_set(&self, name: &str) -> bool {
        match self.get(name) {
            Ok(v) => v.is_some(),
            Err(e) => {
                tracing::warn!(service = %self.service, %name, error = %e, "keychain lookup failed");
                false
            }
        }
    }

    fn entry(&self, name: &str) -> Result<Entry> {
        validate_name(name)?;
        Entry::new(&self.service, name).map_err(|e| keychain_error(name, e))
    }
}

/// Looks up a config reference `SERVICE/ACCOUNT` (the part after `keyring:` in
/// `api_key = "keyring:ai.jemma/heavy_api_key"`; a leading `keyring:` is accepted too).
///
/// `None` when the reference is malformed, the secret is not set, or the keychain fails; the reason is
/// logged (never the value) because callers only report "no keychain entry".
pub fn resolve(reference: &str) -> Option<String> {
    let reference = reference.strip_prefix("keyring:").unwrap_or(reference);
    let Some((service, name)) = reference.split_once('/').filter(|(s, _)| !s.is_empty()) else {
        tracing::warn!(%reference, "keychain reference must look like SERVICE/ACCOUNT");
        return None;
    };
    match Secrets::new(service).get(name) {
        Ok(Some(value)) => Some(value),
        Ok(None) => {
            tracing::debug!(%reference, "keychain entry not set");
            None
        }
        Err(e) => {
            // Often just "no keychain on this headless machine"; callers that need the value say so.
            tracing::debug!(%reference, error = %e, "keychain lookup failed");
            None
        }
    }
}

// The entry-level operations are separate from `Secrets` so tests can exercise them on one mock entry:
// keyring 3's mock store keeps a value only inside the `Entry` that set it.

fn read(entry: &Entry, name: &str) -> Result<Option<String>> {
    match entry.get_password() {
        Ok(v) => Ok(Some(v)),
        Err(keyring::Error::NoEntry) => Ok(None),
        Err(e) => Err(keychain_error(name, e)),
    }
}

fn write(entry: &Entry, name: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return remove(entry, name);
    }
    entry
        .set_password(value)
        .map_err(|e| keychain_error(name, e))
}

fn remove(entry: &Entry, name: &str) -> Result<()> {
    match entry.delete_credential() {
        Ok(()) | Err(keyring::Error::NoEntry) => Ok(()),
        Err(e) => Err(keychain_error(name, e)),
    }
}

/// Maps a keyring error to ours with a message of our own, because two variants carry data that must not
/// reach a log: `BadEncoding` holds the stored bytes (a secret) and `Ambiguous` holds credential handles.
fn keychain_error(name: &str, e: keyring::Error) -> Error {
    let message = match e {
        keyring::Error::NoStorageAccess(inner) => {
            format!("the keychain is locked or not reachable ({inner})")
        }
        keyring::Error::PlatformFailure(inner) => format!("the keychain failed ({inner})"),
        keyring::Error::NoEntry => "not set".to_string(),
        keyring::Error::BadEncoding(_) => "the stored value is not UTF-8 text".to_string(),
        keyring::Error::Ambiguous(items) => format!(
            "{} keychain entries match; remove the duplicates in the keychain app",
            items.len()
        ),
        other => other.to_string(),
    };
    Error::Keychain {
        name: name.to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every test here uses keyring's in-memory mock, never the machine's keychain.
    fn mock_store() {
        keyring::set_default_credential_builder(keyring::mock::default_credential_builder());
    }

    fn mock_entry() -> Entry {
        mock_store();
        Entry::new(SERVICE, "hf_token").unwrap()
    }

    fn set_mock_error(entry: &Entry, err: keyring::Error) {
        entry
            .get_credential()
            .downcast_ref::<keyring::mock::MockCredential>()
            .expect("mock credential")
            .set_error(err);
    }

    #[test]
    fn names() {
        for ok in ["heavy_api_key", "hf_token", "a", "x1", &"a".repeat(64)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Heavy",
            "hf-token",
            "hf token",
            "a/b",
            "ключ",
            "a.b",
            &"a".repeat(65),
        ] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidSecretName(n)) if n == bad),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn invalid_names_never_reach_the_keychain() {
        mock_store();
        let s = Secrets::default();
        assert!(matches!(
            s.get("HF_TOKEN"),
            Err(Error::InvalidSecretName(_))
        ));
        assert!(matches!(
            s.set("../x", "v"),
            Err(Error::InvalidSecretName(_))
        ));
        assert!(matches!(s.delete(""), Err(Error::InvalidSecretName(_))));
        assert!(!s.is_set("Nope"));
    }

    #[test]
    fn secrets_api_over_the_mock_store() {
        mock_store();
        let s = Secrets::new(SERVICE);
        assert_eq!(s.service(), "ai.jemma");
        // Each call builds a fresh mock entry, which starts empty: this checks the plumbing and that
        // "not set" is Ok(None) / Ok(()) rather than an error.
        assert_eq!(s.get("hf_token").unwrap(), None);
        s.set("hf_token", "hunter2").unwrap();
        s.set("hf_token", "").unwrap();
        s.delete("hf_token").unwrap();
        assert!(!s.is_set("hf_token"));
        assert_eq!(format!("{s:?}"), r#"Secrets { service: "ai.jemma" }"#);
    }

    #[test]
    fn round_trip_on_one_entry() {
        let entry = mock_entry();
        assert_eq!(read(&entry, "hf_token").unwrap(), None);
        write(&entry, "hf_token", "hunter2").unwrap();
        assert_eq!(
            read(&entry, "hf_token").unwrap().as_deref(),
            Some("hunter2")
        );
        write(&entry, "hf_token", "correct horse").unwrap();
        assert_eq!(
            read(&entry, "hf_token").unwrap().as_deref(),
            Some("correct horse")
        );
        // Empty value deletes; deleting again is still fine.
        write(&entry, "hf_token", "").unwrap();
        assert_eq!(read(&entry, "hf_token").unwrap(), None);
        remove(&entry, "hf_token").unwrap();
    }

    #[test]
    fn keychain_errors_are_mapped_without_values() {
        let entry = mock_entry();
        write(&entry, "hf_token", "hunter2").unwrap();
        set_mock_error(&entry, keyring::Error::BadEncoding(b"hunter2\xff".to_vec()));
        let err = read(&entry, "hf_token").unwrap_err();
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(!shown.contains("104, 117"), "{shown}"); // the bytes of "hu…"
        }
        assert!(
            matches!(&err, Error::Keychain { name, message } if name == "hf_token" && message.contains("UTF-8"))
        );

        let locked: Box<dyn std::error::Error + Send + Sync> = "collection is locked".into();
        set_mock_error(&entry, keyring::Error::NoStorageAccess(locked));
        let err = write(&entry, "hf_token", "new").unwrap_err();
        assert!(err.to_string().contains("locked"), "{err}");
        assert!(!err.to_string().contains("new"), "{err}");

        set_mock_error(
            &entry,
            keyring::Error::PlatformFailure("dbus went away".into()),
        );
        let err = remove(&entry, "hf_token").unwrap_err();
        assert_eq!(
            err.to_string(),
            "keychain error for hf_token: the keychain failed (dbus went away)"
        );
        // Errors are one-shot in the mock: the entry still holds its value afterwards.
        assert_eq!(
            read(&entry, "hf_token").unwrap().as_deref(),
            Some("hunter2")
        );
    }

    #[test]
    fn resolve_rejects_malformed_references() {
        mock_store();
        for bad in [
            "",
            "ai.jemma",
            "/heavy_api_key",
            "ai.jemma/",
            "ai.jemma/Heavy",
            "ai.jemma/a/b",
        ] {
            assert_eq!(resolve(bad), None, "{bad:?}");
        }
        // Well-formed but unset in the (fresh) mock store.
        assert_eq!(resolve("ai.jemma/heavy_api_key"), None);
        assert_eq!(resolve("keyring:ai.jemma/heavy_api_key"), None);
    }
}
