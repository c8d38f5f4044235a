//! "Expose on tailnet": `tailscale serve` for the gateway port, through jemma-platform. Failures (no CLI,
//! logged out, no MagicDNS) are shown in the tray line, never swallowed.

use jemma_platform::tailscale::Tailscale;

/// The tray's Tailscale line (menu items must stay short: the full error goes to the log).
pub async fn status_line() -> String {
    let status = match Tailscale::detect() {
        Ok(t) => t.status().await,
        Err(e) => Err(e),
    };
    match status {
        Ok(s) => s.summary(),
        Err(e) => {
            tracing::info!(error = %e, "tailscale status");
            format!("Tailscale: {}", crate::tray::short_error(&e.to_string()))
        }
    }
}

/// Exposes or withdraws the gateway; returns the new status line.
pub async fn set_exposed(on: bool, port: u16) -> Result<String, String> {
    let t = Tailscale::detect().map_err(|e| e.to_string())?;
    if on {
        let info = t.expose(port).await.map_err(|e| e.to_string())?;
        Ok(format!("Tailscale: serving {}", info.url))
    } else {
        t.unexpose().await.map_err(|e| e.to_string())?;
        Ok(status_line().await)
    }
}
