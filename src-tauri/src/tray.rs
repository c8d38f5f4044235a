//! The menu-bar icon and its menu, refreshed about once a second from cheap snapshots (router status,
//! sysinfo); clicking never blocks on a generation.

use std::sync::Arc;
use std::time::Duration;

use jemma_router::backend::BackendState;
use jemma_router::breaker::BreakerState;
use jemma_router::classify::Tier;
use jemma_router::route::TierStatus;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
use tauri::menu::{CheckMenuItem, Menu, MenuItem, PredefinedMenuItem, Submenu};
use tauri::tray::TrayIconBuilder;
use tauri::{AppHandle, Wry};
use tauri_plugin_autostart::ManagerExt;
use tauri_plugin_clipboard_manager::ClipboardExt;

use crate::core::{Core, JoinedPeer};

/// A peer's tier offered in the Peers menu: checked while it serves in this node's tier of that name.
#[derive(Clone)]
struct Offer {
    peer: JoinedPeer,
    item: CheckMenuItem<Wry>,
}

/// The Peers submenu: "Find Jemma peers", then one check item per peer tier found (or joined).
#[derive(Clone)]
struct PeersMenu {
    menu: Submenu<Wry>,
    scan: MenuItem<Wry>,
    offers: Arc<std::sync::Mutex<Vec<Offer>>>,
    /// Bumped at each scan, so a new scan's item ids never repeat an old one's.
    generation: Arc<std::sync::atomic::AtomicU64>,
}

/// Handles to the menu items that change.
#[derive(Clone)]
pub struct TrayItems {
    tiers: Vec<(Tier, MenuItem<Wry>)>,
    download: MenuItem<Wry>,
    memory: MenuItem<Wry>,
    requests: MenuItem<Wry>,
    heavy: CheckMenuItem<Wry>,
    autostart: CheckMenuItem<Wry>,
    tailnet: CheckMenuItem<Wry>,
    tailscale: MenuItem<Wry>,
    peers: PeersMenu,
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// One line per tier: state, model, last tok/s (and the draft acceptance rate when it speculates).
pub fn tier_line(s: &TierStatus) -> String {
    let state = if !s.enabled {
        "disabled".to_string()
    } else if s.waking {
        "waking…".to_string()
    } else if s.breaker.state != BreakerState::Closed {
        "breaker open".to_string()
    } else {
        match s.backend.state {
            BackendState::Failed | BackendState::Error => "error".to_string(),
            BackendState::Unloaded => "idle-unloaded".to_string(),
            other => other.to_string(),
        }
    };
    let model = short_model(&s.backend.model);
    let mut tps = if s.backend.tokens_per_second > 0.0 {
        format!(" · {:.1} tok/s", s.backend.tokens_per_second)
    } else {
        String::new()
    };
    // Speculative decoding: the share of drafted tokens that stood, once a draft has been verified.
    let spec = &s.backend.details["speculative"];
    if spec["draft_tokens"].as_u64().unwrap_or(0) > 0
        && let Some(rate) = spec["acceptance_rate"].as_f64()
    {
        tps.push_str(&format!(" · {:.0}% drafts accepted", rate * 100.0));
    }
    let name = match s.tier {
        Tier::Fast => "Fast",
        Tier::Primary => "Primary",
        Tier::Heavy => "Heavy",
    };
    format!("{name} · {state} · {model}{tps}")
}

/// Builds the tray and starts its refresh loop.
pub fn build(app: &AppHandle, core: Arc<Core>) -> tauri::Result<()> {
    let status = core.router.status();
    let mut tiers = vec![];
    for s in &status {
        tiers.push((
            s.tier,
            MenuItem::with_id(
                app,
                format!("tier-{}", s.tier),
                tier_line(s),
                false,
                None::<&str>,
            )?,
        ));
    }
    let url = MenuItem::with_id(
        app,
        "url",
        format!("Gateway: {} (click to copy)", core.url),
        true,
        None::<&str>,
    )?;
    let memory = MenuItem::with_id(app, "memory", "Memory: …", false, None::<&str>)?;
    let download = MenuItem::with_id(app, "download", "Download models", false, None::<&str>)?;
    let requests = MenuItem::with_id(app, "requests", "Requests served: 0", false, None::<&str>)?;
    let heavy_on = status.iter().any(|s| s.tier == Tier::Heavy && s.enabled);
    let heavy = CheckMenuItem::with_id(
        app,
        "heavy",
        "Heavy tier",
        status.iter().any(|s| s.tier == Tier::Heavy),
        heavy_on,
        None::<&str>,
    )?;
    let autostart_on = app.autolaunch().is_enabled().unwrap_or(false);
    let autostart = CheckMenuItem::with_id(
        app,
        "autostart",
        "Launch at login",
        true,
        autostart_on,
        None::<&str>,
    )?;
    let tailnet = CheckMenuItem::with_id(
        app,
        "tailnet",
        "Expose on tailnet",
        true,
        false,
        None::<&str>,
    )?;
    let tailscale = MenuItem::with_id(
        app,
        "tailscale",
        "Tailscale: checking…",
        false,
        None::<&str>,
    )?;
    let scan = MenuItem::with_id(app, "peers-scan", "Find Jemma peers", true, None::<&str>)?;
    let peers = PeersMenu {
        menu: Submenu::with_id_and_items(app, "peers", "Peers", true, &[&scan])?,
        scan,
        offers: Arc::default(),
        generation: Arc::default(),
    };
    let chat = MenuItem::with_id(app, "chat", "Open Chat", true, None::<&str>)?;
    let settings = MenuItem::with_id(app, "settings", "Settings…", true, None::<&str>)?;
    let quit = MenuItem::with_id(app, "quit", "Quit Jemma", true, None::<&str>)?;
    let sep = || PredefinedMenuItem::separator(app);
    let mut items: Vec<&dyn tauri::menu::IsMenuItem<Wry>> = vec![];
    for (_, t) in &tiers {
        items.push(t);
    }
    let (s1, s2, s3) = (sep()?, sep()?, sep()?);
    items.extend([
        &download as &dyn tauri::menu::IsMenuItem<Wry>,
        &s1,
        &memory,
        &requests,
        &url,
        &s2,
        &heavy,
        &autostart,
        &tailnet,
        &tailscale,
        &peers.menu,
        &s3,
        &chat,
        &settings,
        &quit,
    ]);
    let menu = Menu::with_items(app, &items)?;
    let handles = TrayItems {
        tiers,
        download,
        memory,
        requests,
        heavy,
        autostart,
        tailnet,
        tailscale,
        peers,
    };
    let ts = handles.tailscale.clone();
    tauri::async_runtime::spawn(async move {
        let _ = ts.set_text(crate::tailnet::status_line().await);
    });
    let icon = if cfg!(target_os = "macos") {
        tauri::image::Image::from_bytes(include_bytes!("../../icons/tray-template.png"))?
    } else {
        tauri::image::Image::from_bytes(include_bytes!("../../icons/tray.png"))?
    };
    let h = handles.clone();
    let c = core.clone();
    TrayIconBuilder::with_id("jemma")
        .icon(icon)
        .icon_as_template(cfg!(target_os = "macos"))
        .tooltip("Jemma")
        .menu(&menu)
        .show_menu_on_left_click(true)
        .on_menu_event(move |app, event| on_menu(app, event.id().as_ref(), &c, &h))
        .build(app)?;
    tauri::async_runtime::spawn(scan_peers(app.clone(), core.clone(), handles.peers.clone()));
    let app2 = app.clone();
    tauri::async_runtime::spawn(async move {
        let mut sys = System::new();
        loop {
            refresh(&app2, &core, &handles, &mut sys);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    Ok(())
}

/// The last path of a model (a directory or repo), as the tier lines show it.
fn short_model(model: &str) -> String {
    std::path::Path::new(model)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.to_string())
}

/// A menu line from an error: its first clause, at most 60 characters.
pub fn short_error(msg: &str) -> String {
    msg.split([':', '('])
        .next()
        .unwrap_or(msg)
        .trim()
        .chars()
        .take(60)
        .collect()
}

/// Finds the Jemma nodes on the tailnet and offers each tier of theirs that this node also has (and
/// every peer joined before, found or not, so it can be left).
async fn scan_peers(app: AppHandle, core: Arc<Core>, p: PeersMenu) {
    let _ = p.scan.set_enabled(false);
    let _ = p.scan.set_text("Finding Jemma peers…");
    let found = core.find_peers().await;
    let ours = core.router.tiers();
    let mut offers: Vec<(JoinedPeer, String)> = vec![];
    for n in found.as_deref().unwrap_or_default() {
        for (t, pt) in &n.tiers {
            let Ok(tier) = t.parse::<Tier>() else {
                continue;
            };
            if !ours.contains(&tier) || !pt.enabled {
                continue;
            }
            offers.push((
                JoinedPeer {
                    tier: t.clone(),
                    node: n.name.clone(),
                    url: n.url.clone(),
                },
                format!(
                    "{} · {t} · {} · {}",
                    n.name,
                    short_model(&pt.model),
                    pt.state
                ),
            ));
        }
    }
    let joined = core
        .settings
        .lock()
        .map(|s| s.peers.clone())
        .unwrap_or_default();
    for j in joined {
        if !offers
            .iter()
            .any(|(o, _)| o.tier == j.tier && o.node == j.node)
        {
            let label = format!("{} · {} · not found", j.node, j.tier);
            offers.push((j, label));
        }
    }
    let generation = p
        .generation
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut items = vec![];
    for (i, (peer, label)) in offers.into_iter().enumerate() {
        let checked = peer
            .tier
            .parse()
            .is_ok_and(|t| core.is_joined(t, &peer.node));
        match CheckMenuItem::with_id(
            &app,
            format!("peer-{generation}-{i}"),
            label,
            true,
            checked,
            None::<&str>,
        ) {
            Ok(item) => items.push(Offer { peer, item }),
            Err(e) => tracing::warn!(error = %e, "peers menu item"),
        }
    }
    let mut cur = p.offers.lock().unwrap_or_else(|e| e.into_inner());
    for o in cur.drain(..) {
        let _ = p.menu.remove(&o.item);
    }
    for o in &items {
        let _ = p.menu.append(&o.item);
    }
    *cur = items;
    let _ = p.scan.set_text(match &found {
        Ok(nodes) => format!("Find Jemma peers · {} found", nodes.len()),
        Err(e) => {
            tracing::info!(error = %e, "finding peers");
            format!("Find Jemma peers · {}", short_error(&e.to_string()))
        }
    });
    let _ = p.scan.set_enabled(true);
}

fn refresh(app: &AppHandle, core: &Core, h: &TrayItems, sys: &mut System) {
    let status = core.router.status();
    // A join that failed, or a peer that left some other way, shows unchecked.
    for o in h
        .peers
        .offers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        if let Ok(t) = o.peer.tier.parse() {
            let _ = o.item.set_checked(core.is_joined(t, &o.peer.node));
        }
    }
    for (tier, item) in &h.tiers {
        if let Some(s) = status.iter().find(|s| s.tier == *tier) {
            let _ = item.set_text(tier_line(s));
        }
    }
    if let Some(s) = status.iter().find(|s| s.tier == Tier::Heavy) {
        let _ = h.heavy.set_checked(s.enabled);
        let _ = h.heavy.set_text(if s.waking {
            "Heavy tier (waking…)"
        } else {
            "Heavy tier"
        });
    }
    // "Download models" is offered while a tier's model is not on disk (first launch); it stays greyed
    // out while a download runs (the tier lines show "downloading n%").
    let missing = status
        .iter()
        .any(|s| s.backend.state == BackendState::NotDownloaded);
    let downloading = status
        .iter()
        .any(|s| matches!(s.backend.state, BackendState::Downloading { .. }));
    let _ = h.download.set_enabled(missing && !downloading);
    let _ = h.download.set_text(if downloading {
        "Downloading models…"
    } else if missing {
        "Download models"
    } else {
        "Models downloaded"
    });
    sys.refresh_memory();
    let pid = Pid::from_u32(std::process::id());
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        true,
        ProcessRefreshKind::nothing().with_memory(),
    );
    let rss = sys.process(pid).map(|p| p.memory()).unwrap_or(0);
    // Local tiers sharing one engine report the same figures: count each model once.
    let mut mlx = std::collections::BTreeMap::new();
    let mut served = 0u64;
    for s in &status {
        if let Some(a) = s
            .backend
            .details
            .get("mlx_active_bytes")
            .and_then(|v| v.as_u64())
        {
            mlx.insert(s.backend.model.clone(), a);
        }
        served += s.served;
    }
    let _ = h.memory.set_text(format!(
        "Memory: {:.1}/{:.1} GB · app {:.0} MB · MLX {:.0} MB",
        gib(sys.used_memory()),
        gib(sys.total_memory()),
        rss as f64 / 1e6,
        mlx.values().sum::<u64>() as f64 / 1e6
    ));
    let _ = h.requests.set_text(format!("Requests served: {served}"));
    let _ = h
        .autostart
        .set_checked(app.autolaunch().is_enabled().unwrap_or(false));
}

fn on_menu(app: &AppHandle, id: &str, core: &Arc<Core>, h: &TrayItems) {
    match id {
        "url" => {
            if let Err(e) = app.clipboard().write_text(core.url.clone()) {
                tracing::warn!(error = %e, "copying the gateway URL failed");
            }
        }
        "download" => {
            let missing: Vec<(Tier, String)> = core
                .router
                .status()
                .into_iter()
                .filter(|s| s.backend.state == BackendState::NotDownloaded)
                .map(|s| (s.tier, s.backend.model.clone()))
                .collect();
            let r = core.router.clone();
            tauri::async_runtime::spawn(async move {
                // One at a time: tiers naming the same model find it in the cache the second time.
                for (tier, model) in missing {
                    if let Err(e) = r.set_model(tier, &model).await {
                        tracing::warn!(%tier, %model, error = %e, "model download failed");
                    }
                }
            });
        }
        "heavy" => {
            let on = h.heavy.is_checked().unwrap_or(false);
            if let Err(e) = core.router.set_enabled(Tier::Heavy, on) {
                tracing::warn!(error = %e, "heavy toggle failed");
                return;
            }
            if on {
                // Turning the cloud tier on wakes it now, so the first real request does not pay the cold start.
                let r = core.router.clone();
                tauri::async_runtime::spawn(async move {
                    let ok = r.warm_up(Tier::Heavy).await.unwrap_or(false);
                    tracing::info!(ok, "heavy tier warm-up finished");
                });
            }
        }
        "autostart" => {
            let al = app.autolaunch();
            let want = h.autostart.is_checked().unwrap_or(false);
            let r = if want { al.enable() } else { al.disable() };
            if let Err(e) = r {
                tracing::warn!(error = %e, "launch-at-login change failed");
            }
        }
        "tailnet" => {
            let want = h.tailnet.is_checked().unwrap_or(false);
            let item = h.tailscale.clone();
            let toggle = h.tailnet.clone();
            let port = core.port;
            let core = core.clone();
            tauri::async_runtime::spawn(async move {
                // Tailnet callers are remote callers: they need a key, so exposing provisions one (the
                // keychain blocks: off the async runtime).
                let provisioned = tauri::async_runtime::spawn_blocking(move || {
                    want.then(|| core.ensure_remote_key())
                })
                .await
                .unwrap_or_else(|e| Some(Err(anyhow::anyhow!("the keychain task failed: {e}"))));
                let key_note = match provisioned {
                    Some(Ok(true)) => " · API key in keychain (gateway_api_key)",
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "could not create an API key for tailnet callers");
                        " · no API key: run jemma keys create"
                    }
                    _ => "",
                };
                let text = match crate::tailnet::set_exposed(want, port).await {
                    Ok(t) => format!("{t}{key_note}"),
                    Err(e) => {
                        let _ = toggle.set_checked(!want);
                        format!("Tailscale: {e}")
                    }
                };
                let _ = item.set_text(text);
            });
        }
        "peers-scan" => {
            tauri::async_runtime::spawn(scan_peers(app.clone(), core.clone(), h.peers.clone()));
        }
        id if id.starts_with("peer-") => {
            let Some(o) = h
                .peers
                .offers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|o| o.item.id().as_ref() == id)
                .cloned()
            else {
                return;
            };
            let want = o.item.is_checked().unwrap_or(false);
            let core = core.clone();
            let scan = h.peers.scan.clone();
            // Within the runtime: a tier that becomes a pool starts its prober there.
            tauri::async_runtime::spawn(async move {
                let Ok(tier) = o.peer.tier.parse::<Tier>() else {
                    return;
                };
                let node = o.peer.node.clone();
                let r = if want {
                    core.join_peer(o.peer)
                } else {
                    core.leave_peer(tier, &node)
                };
                if let Err(e) = r {
                    tracing::warn!(%tier, %node, join = want, error = %e, "peer change failed");
                    let _ = scan.set_text(format!("{node}: {}", short_error(&e.to_string())));
                }
                let _ = o.item.set_checked(core.is_joined(tier, &node));
            });
        }
        "chat" => crate::open_window(app, "chat"),
        "settings" => crate::open_window(app, "settings"),
        "quit" => {
            let app = app.clone();
            let core = core.clone();
            tauri::async_runtime::spawn(async move {
                core.shutdown(Duration::from_secs(10)).await;
                app.exit(0);
            });
        }
        _ => {}
    }
}
