//! Jemma's menu-bar app: hosts the gateway and the local engines in its Rust backend (on Tauri's tokio
//! runtime), shows live tier status in the tray, and offers a chat window and settings. Commands are thin:
//! the work lives in jemma-node (which builds the router and its engines), jemma-gateway and jemma-platform.
#![deny(missing_docs)]

mod core;
mod tailnet;
mod tray;

use std::sync::Arc;

use jemma_platform::secrets::Secrets;
use jemma_router::classify::Tier;
use serde_json::{Value, json};
use tauri::{AppHandle, Manager, RunEvent, State, WebviewUrl, WebviewWindowBuilder};

use crate::core::{Core, KEYCHAIN_SERVICE, Settings};

type CoreState<'a> = State<'a, Arc<Core>>;

/// The gateway's base URL (the chat window talks to the same API local apps use).
#[tauri::command]
fn gateway_url(core: CoreState<'_>) -> String {
    core.url.clone()
}

/// Tier status for the UI.
#[tauri::command]
fn app_status(core: CoreState<'_>) -> Value {
    json!({ "url": core.url, "tiers": core.router.status() })
}

/// Settings plus which secrets are stored (never their values).
#[tauri::command]
fn get_settings(core: CoreState<'_>) -> Result<Value, String> {
    let s = core.settings.lock().map_err(|e| e.to_string())?.clone();
    let secrets = Secrets::new(KEYCHAIN_SERVICE);
    Ok(json!({
        "heavy_url": s.heavy_url,
        "models": s.models,
        "keep_alive": s.keep_alive,
        "peers": s.peers,
        "secrets": {
            "heavy_api_key": secrets.is_set("heavy_api_key"),
            "hf_token": secrets.is_set("hf_token"),
            "peer_api_key": secrets.is_set(crate::core::PEER_KEY_ACCOUNT),
        },
    }))
}

/// Saves settings (applied at the next start).
#[tauri::command]
fn save_settings(core: CoreState<'_>, settings: Settings) -> Result<(), String> {
    let url = &settings.heavy_url;
    if !(url.is_empty() || url.starts_with("https://") || url.starts_with("http://")) {
        return Err(
            "the heavy-tier URL must start with https:// (or http:// for a local test)".into(),
        );
    }
    core.save_settings(settings).map_err(|e| e.to_string())
}

/// Stores a secret in the OS keychain; an empty value deletes it.
#[tauri::command]
fn set_secret(name: String, value: String) -> Result<(), String> {
    Secrets::new(KEYCHAIN_SERVICE)
        .set(&name, &value)
        .map_err(|e| e.to_string())
}

/// Turns a tier on or off (the heavy toggle; a warm-up request wakes a cold cloud tier).
#[tauri::command]
async fn set_tier(core: CoreState<'_>, tier: String, enabled: bool) -> Result<(), String> {
    let t: Tier = tier.parse().map_err(|_| format!("unknown tier {tier}"))?;
    core.router
        .set_enabled(t, enabled)
        .map_err(|e| e.to_string())?;
    if enabled && t == Tier::Heavy {
        let r = core.router.clone();
        tauri::async_runtime::spawn(async move {
            let _ = r.warm_up(Tier::Heavy).await;
        });
    }
    Ok(())
}

/// Shows (creating if needed) the chat or settings window.
pub fn open_window(app: &AppHandle, label: &str) {
    if let Some(w) = app.get_webview_window(label) {
        let _ = w.show();
        let _ = w.set_focus();
        return;
    }
    let (page, title, size) = match label {
        "settings" => ("settings.html", "Jemma Settings", (480.0, 560.0)),
        _ => ("index.html", "Jemma", (900.0, 720.0)),
    };
    if let Err(e) = WebviewWindowBuilder::new(app, label, WebviewUrl::App(page.into()))
        .title(title)
        .inner_size(size.0, size.1)
        .min_inner_size(420.0, 480.0)
        .build()
    {
        tracing::error!(error = %e, label, "cannot open window");
    }
}

/// Runs the app until Quit.
pub fn run() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("JEMMA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Launched at login: start in the menu bar only.
    let hidden = std::env::args().any(|a| a == "--hidden");
    #[expect(
        clippy::expect_used,
        reason = "an app that cannot build its window system has nothing to fall back to"
    )]
    let app = tauri::Builder::default()
        .plugin(tauri_plugin_autostart::init(
            tauri_plugin_autostart::MacosLauncher::LaunchAgent,
            Some(vec!["--hidden"]),
        ))
        .plugin(tauri_plugin_clipboard_manager::init())
        .invoke_handler(tauri::generate_handler![
            gateway_url,
            app_status,
            get_settings,
            save_settings,
            set_secret,
            set_tier
        ])
        .setup(move |app| {
            #[cfg(target_os = "macos")]
            app.set_activation_policy(tauri::ActivationPolicy::Accessory);
            let dir = app.path().app_config_dir()?;
            let core = tauri::async_runtime::block_on(Core::start(dir))?;
            app.manage(core.clone());
            tray::build(app.handle(), core)?;
            if !hidden {
                open_window(app.handle(), "chat");
            }
            Ok(())
        })
        .build(tauri::generate_context!())
        .expect("building the Jemma app");
    app.run(|_app, event| {
        // A menu-bar app keeps running when its last window closes; Quit exits explicitly.
        if let RunEvent::ExitRequested {
            api, code: None, ..
        } = event
        {
            api.prevent_exit();
        }
    });
}
