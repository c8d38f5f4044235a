//! Finding other Jemma nodes: each candidate (a machine on the tailnet, from `tailscale status --json`) is
//! asked for its `/health`; those that answer with Jemma's handshake (`jemma.version`) are nodes, and
//! their tiers say which models they serve. A node found this way joins a pool as a `jemma` endpoint
//! (`[[tiers.<tier>.endpoints]]`, see [`crate::pool`]); calls to it carry an API key like any remote
//! caller's.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// A machine that may run Jemma.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Its name (the tailnet host name).
    pub name: String,
    /// Where its gateway would listen, e.g. `http://100.88.12.54:8080`.
    pub url: String,
}

/// One tier of another node, from its `/health`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PeerTier {
    /// The model it serves (empty while none is loaded or downloaded).
    pub model: String,
    /// Its backend's state (`ready`, `loading 42%`, `unknown`, …).
    pub state: String,
    /// Whether it takes requests.
    pub enabled: bool,
}

/// Another Jemma node.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PeerNode {
    /// Its name.
    pub name: String,
    /// Its gateway's base URL.
    pub url: String,
    /// Its Jemma version.
    pub version: String,
    /// Its `/health` status (`ok`, `degraded`, `starting`, `down`).
    pub status: String,
    /// Its tiers by name.
    pub tiers: BTreeMap<String, PeerTier>,
}

/// Asks every candidate's `/health` at once (each within `timeout`) and returns the Jemma nodes among
/// them, in the candidates' order. Machines that do not answer, or answer as something else, are left
/// out.
pub async fn identify(candidates: &[Candidate], timeout: Duration) -> Vec<PeerNode> {
    let Ok(client) = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
    else {
        return vec![];
    };
    let asks = candidates.iter().map(|c| {
        let client = client.clone();
        async move {
            let url = c.url.trim_end_matches('/');
            let r = client.get(format!("{url}/health")).send().await.ok()?;
            let v: Value = r.json().await.ok()?;
            node_of(&c.name, url, &v)
        }
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Reads a `/health` answer as a Jemma node's; None when it lacks the handshake.
pub fn node_of(name: &str, url: &str, health: &Value) -> Option<PeerNode> {
    let version = health["jemma"]["version"].as_str()?.to_string();
    let tiers = health["tiers"]
        .as_object()
        .map(|t| {
            t.iter()
                .map(|(k, t)| {
                    (
                        k.clone(),
                        PeerTier {
                            model: t["backend"]["model"].as_str().unwrap_or("").to_string(),
                            state: t["backend"]["state"].as_str().unwrap_or("").to_string(),
                            enabled: t["enabled"].as_bool().unwrap_or(false),
                        },
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Some(PeerNode {
        name: name.to_string(),
        url: url.to_string(),
        version,
        status: health["status"].as_str().unwrap_or("").to_string(),
        tiers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_an_answer_with_the_handshake_is_a_node() {
        let h = json!({"status": "ok", "jemma": {"version": "0.1.0"},
            "tiers": {"primary": {"enabled": true, "backend": {"model": "gemma-4-e4b", "state": "ready"}}}});
        let n = node_of("mini-2", "http://100.1.2.3:8080", &h).unwrap();
        assert_eq!(n.version, "0.1.0");
        assert_eq!(
            n.tiers["primary"],
            PeerTier {
                model: "gemma-4-e4b".into(),
                state: "ready".into(),
                enabled: true
            }
        );
        // Some other server's /health.
        assert!(node_of("box", "http://x", &json!({"status": "ok"})).is_none());
    }
}
