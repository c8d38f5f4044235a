"""End-to-end test of the menu-bar app on Linux: the real Tauri window under Xvfb driven through
tauri-driver + WebKitWebDriver, the tray read and clicked over D-Bus (StatusNotifierItem + dbusmenu), the
keychain through gnome-keyring's Secret Service. Run by scripts/test-app.sh (which sets up Xvfb, the D-Bus
session, an unlocked keyring, an isolated HOME and the config).

Env: APP (binary), SHOTS (screenshot dir), JEMMA_CONFIG, HOME, JEMMA_PORT=0; the deadlines' settings are in
harness.py. Every step has a deadline and a name: a hang fails the run with the step that hung.
"""
import json
import os
import pathlib
import subprocess
import sys
import time
import urllib.request

from selenium.webdriver.common.by import By
from selenium.common.exceptions import (NoSuchElementException, NoSuchFrameException,
                                        StaleElementReferenceException)
from selenium.webdriver.support.ui import WebDriverWait

sys.path.insert(0, os.path.dirname(__file__))
from harness import log, new_session, routing_badges, step  # noqa: E402
from sni import Tray  # noqa: E402
import fake_hub  # noqa: E402

APP = os.environ["APP"]
SHOTS = pathlib.Path(os.environ.get("SHOTS", "."))
HOME = pathlib.Path(os.environ["HOME"])
passed = 0


def check(name, cond, detail=""):
    global passed
    if not cond:
        print(f"FAIL {name}: {detail}", flush=True)
        raise SystemExit(1)
    passed += 1
    print(f"ok   {name}", flush=True)


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_for(what, fn, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.3)
    raise SystemExit(f"FAIL timed out waiting for {what}")


# The app inherits HF_ENDPOINT through tauri-driver: its downloads go to the stand-in Hub.
os.environ["HF_ENDPOINT"] = fake_hub.serve("jemma-test/gemma-4-tiny", str(pathlib.Path(__file__).parents[2] / "fixtures" / "tiny"))
os.environ["HF_TOKEN"] = ""


def start_peer():
    """Another Jemma node on the tailnet: a real `jemma serve` (the tiny model as its fast and primary tiers)
    on 127.0.0.2, listed by the stand-in `tailscale status` as the online machine "mini-2"; the app finds it
    on the port its [peers] config names."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JEMMA_")}
    root = pathlib.Path(__file__).parents[2]
    proc = subprocess.Popen([os.environ["JEMMA_BIN"], "serve", "--model", str(root / "fixtures" / "tiny"),
                             "--host", "127.0.0.2", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.2:{port}"

    def ready():
        if proc.poll() is not None:
            raise SystemExit(f"FAIL the peer node exited with {proc.returncode}")
        status, health = get_or_error(f"{url}/health")
        return status == 200 and health["tiers"]["fast"]["backend"]["state"] == "ready"
    wait_for("the peer node's /health", ready, timeout=60)
    with open(os.environ["JEMMA_CONFIG"], "a") as f:
        f.write(f"\n[peers]\nport = {port}\ntimeout_secs = 1\n")
    status_path = pathlib.Path(os.environ["TAILSCALE_STATUS"])
    status = json.loads(status_path.read_text())
    status["Peer"]["nodekey:e2e-peer"] = {"HostName": "mini-2", "DNSName": "mini-2.tail1234.ts.net.",
                                          "TailscaleIPs": ["127.0.0.2"], "Online": True, "OS": "macOS"}
    status_path.write_text(json.dumps(status))
    return proc, url


def get_or_error(url):
    try:
        return get(url)
    except OSError as e:
        return 0, str(e)


with step("a peer Jemma node on the tailnet", 90):
    peer, peer_url = start_peer()
with step("StatusNotifierWatcher on the session bus", 30):
    tray = Tray()
drv, d = None, None
try:
    drv, d = new_session(APP)
    invoke = lambda cmd, args=None: d.execute_async_script(  # noqa: E731
        "const cb = arguments[arguments.length - 1];"
        "window.__TAURI__.core.invoke(arguments[0], arguments[1] || {}).then(v => cb({ok: v}), e => cb({err: String(e)}));",
        cmd, args or {})
    with step("first command: gateway_url and /health", 45):
        gw = invoke("gateway_url")["ok"]
        check("gateway_url command", gw.startswith("http://127.0.0.1:"), gw)
        status, health = get(f"{gw}/health")
        check("the app's gateway serves /health", status == 200 and health["tiers"]["fast"]["backend"]["state"] == "ready", health)

    # --- chat: a streamed reply from the fixture model with its routing badge
    with step('chat: a streamed reply with its routing badge', 90):
        WebDriverWait(d, 20).until(lambda d: d.find_element(By.ID, "prompt").is_displayed())
        d.execute_script("const s = document.getElementById('tier'); s.value = 'fast'; s.dispatchEvent(new Event('change'));")
        box = d.find_element(By.ID, "prompt")
        box.send_keys("Hello Jemma, write a short greeting.")
        d.find_element(By.ID, "send").click()
        badge = WebDriverWait(d, 60).until(routing_badges)[0]
        routing = badge["routing"]
        check("chat: reply streamed with a routing badge", routing["tier"] == "fast" and routing["completion_tokens"] >= 1, routing)
        reply = d.execute_script("return [...document.querySelectorAll('.msg.assistant')].pop().innerText")
        check("chat: badge shows tier and latency", "fast" in badge["text"] and "ms" in badge["text"], badge["text"])
        check("chat: reply text present", len(reply.strip()) > 0, reply)
        SHOTS.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(SHOTS / "chat-window.png"))

    # --- first launch: the primary tier's model is not on disk; one click on the tray downloads it
    with step('first launch: one-click model download', 150):
        labels = wait_for("tray tier lines", lambda: tray.labels() or None)
        check("tray: the missing model shows as not downloaded",
              any(l.startswith("Primary · not downloaded · test-tiny") for l in labels), labels)
        check("tray: 'Download models' is offered", any(l == "Download models" for l in labels), labels)
        check("health: primary not downloaded", get(f"{gw}/health")[1]["tiers"]["primary"]["backend"]["state"] == "not downloaded")
        tray.click("Download models")
        states = set()

        def primary_ready():
            st = get(f"{gw}/health")[1]["tiers"]["primary"]["backend"]["state"]
            states.add(st)
            for l in tray.labels():
                if l.startswith("Primary · downloading"):
                    states.add("tray:" + l.split(" · ")[1])
            return st == "ready"
        wait_for("the one-click download and load", primary_ready, timeout=90)
        check("download progress was visible (health or tray)", any("downloading" in s for s in states), states)
        snap = HOME / ".." / "hf" / "models--jemma-test--gemma-4-tiny" / "snapshots"
        check("the model landed in the Hugging Face cache layout", any(snap.glob("*/config.json")), list(snap.glob("*")))

    # --- tray: labels, live tok/s, requests served
    with step('tray: labels, tok/s, requests served', 60):
        labels = wait_for("tray tier lines with tok/s and the downloaded tier ready",
                          lambda: (lambda l: l if any("tok/s" in x for x in l) and any(x.startswith("Primary · ready") for x in l)
                                   else None)(tray.labels()))
        for want in ["Fast · ready", "Primary · ready", "Heavy · disabled", "Heavy tier", "Launch at login",
                     "Expose on tailnet", "Open Chat", "Settings…", "Quit Jemma"]:
            check(f"tray has {want!r}", any(l.startswith(want) for l in labels), labels)
        check("tray: requests served counts the chat", any(l.startswith("Requests served: ") and l != "Requests served: 0" for l in labels), labels)
        check("tray: memory line", any(l.startswith("Memory: ") and "GB" in l for l in labels), labels)
        check("tray: tailscale status from the CLI", any(l.startswith("Tailscale: running") and "mac-mini" in l for l in labels), labels)
        (SHOTS / "tray-menu.txt").write_text("\n".join(labels) + "\n")

    # --- heavy toggle changes the gateway's /health
    with step('tray: heavy toggle', 60):
        check("heavy starts disabled", get(f"{gw}/health")[1]["tiers"]["heavy"]["enabled"] is False)
        tray.click("Heavy tier")
        wait_for("heavy enabled in /health", lambda: get(f"{gw}/health")[1]["tiers"]["heavy"]["enabled"])
        check("tray toggle enabled the heavy tier, and it stays enabled",
              get(f"{gw}/health")[1]["tiers"]["heavy"]["enabled"] is True)
        tray.click("Heavy tier")
        wait_for("heavy disabled again", lambda: get(f"{gw}/health")[1]["tiers"]["heavy"]["enabled"] is False)
        check("tray toggle disabled it again, and it stays disabled",
              get(f"{gw}/health")[1]["tiers"]["heavy"]["enabled"] is False)

    # --- launch at login writes the XDG autostart entry (isolated HOME)
    with step('tray: launch at login', 60):
        desktop = HOME / ".config" / "autostart" / "Jemma.desktop"
        check("no autostart entry yet", not desktop.exists())
        tray.click("Launch at login")
        wait_for("autostart entry", desktop.exists)
        text = desktop.read_text()
        check("autostart entry launches the app hidden", "--hidden" in text and APP.split("/")[-1] in text, text)
        tray.click("Launch at login")
        wait_for("autostart entry removed", lambda: not desktop.exists())
        check("launch at login can be turned off", not desktop.exists())

    # --- expose on tailnet runs `tailscale serve` for the gateway port, and undoes it
    with step('tray: expose on tailnet', 60):
        port = gw.rsplit(":", 1)[1]
        calls = pathlib.Path(os.environ["TAILSCALE_CALLS"])
        tray.click("Expose on tailnet")
        wait_for("tailscale serve", lambda: calls.exists() and f"serve --bg --https=443 http://127.0.0.1:{port}" in calls.read_text())
        wait_for("serving line", lambda: any(l.startswith("Tailscale: serving https://mac-mini.tail1234.ts.net") for l in tray.labels()))
        check("expose on tailnet ran tailscale serve, not undone",
              not any(l.startswith("serve") and l.endswith(" off") for l in calls.read_text().splitlines()),
              calls.read_text())
        key = subprocess.run(["secret-tool", "lookup", "service", "ai.jemma", "username", "gateway_api_key"],
                             capture_output=True, text=True).stdout.strip()
        check("exposing provisioned an API key into the keychain", key.startswith("jm-"), key)
        req = urllib.request.Request(f"{gw}/v1/models", headers={"X-Forwarded-For": "100.64.0.9"})
        try:
            urllib.request.urlopen(req, timeout=5)
            check("tailnet-proxied calls need the key", False)
        except urllib.error.HTTPError as e:
            check("tailnet-proxied calls without the key get 401", e.code == 401, e.code)
        req = urllib.request.Request(f"{gw}/v1/models", headers={"X-Forwarded-For": "100.64.0.9",
                                                                 "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            check("the provisioned key is accepted at once", r.status == 200)
        tray.click("Expose on tailnet")
        wait_for("tailscale serve off", lambda: "serve --https=443 off" in calls.read_text())
        serves = [l for l in calls.read_text().splitlines() if l.startswith("serve")]
        check("turning it off ran tailscale serve off last", serves[-1].endswith("--https=443 off"), serves)

    # --- peers: the tray finds the other Jemma node and lets its fast tier join this node's fast tier
    with step('tray: a peer joins and leaves a tier', 90):
        offer = wait_for("the peer offered in the Peers menu",
                         lambda: next((l for l in tray.labels() if l.startswith("mini-2 · fast · ")), None))
        labels = tray.labels()
        check("tray: the Peers menu found one Jemma node", "Find Jemma peers · 1 found" in labels, labels)
        check("tray: only tiers this node has are offered, and machines that are not Jemma nodes are not",
              not any(l.startswith(("alices-iphone", "build-box")) for l in labels), labels)
        check("tray: the peer is not joined yet", [i for i in tray.items() if i["label"] == offer][0]["toggle"] == 0)
        tray.click(offer)

        def members():
            eps = get(f"{gw}/health")[1]["tiers"]["fast"]["backend"].get("details", {}).get("endpoints") or []
            return [e["name"] for e in eps]
        wait_for("the fast tier to become a pool with the peer", lambda: members() == ["local", "mini-2"])
        check("the fast tier is a pool of this node's engine and the peer", members() == ["local", "mini-2"], members())
        seen = set()
        for i in range(12):
            body = json.dumps({"model": "fast", "max_tokens": 2, "temperature": 0,
                               "messages": [{"role": "user", "content": f"Peer question {i}"}]}).encode()
            req = urllib.request.Request(f"{gw}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                seen.add(json.loads(r.read())["_routing"].get("endpoint"))
        check("requests are served by both this node and the peer", seen == {"local", "mini-2"}, seen)
        check("the peer's fast tier answered some", get(f"{peer_url}/health")[1]["tiers"]["fast"]["served"] > 0)
        check("the joined peer is remembered in the settings",
              invoke("get_settings")["ok"]["peers"] == [{"tier": "fast", "node": "mini-2", "url": peer_url}])
        wait_for("the tray check mark", lambda: [i for i in tray.items() if i["label"] == offer][0]["toggle"] == 1)
        tray.click(offer)
        wait_for("the peer to leave the fast tier", lambda: members() == ["local"])
        check("unchecking it takes the peer out of the pool", members() == ["local"], members())
        check("and out of the settings", invoke("get_settings")["ok"]["peers"] == [])
        tray.click("Find Jemma peers")
        wait_for("a second scan", lambda: "Find Jemma peers · 1 found" in tray.labels())
        check("a rescan offers the peer again, unchecked",
              [i for i in tray.items() if i["label"] == offer][0]["toggle"] == 0)

    # --- keychain: store a secret through the app and read it back from the Secret Service
    with step('keychain through the app', 60):
        r = invoke("set_secret", {"name": "heavy_api_key", "value": "sk-e2e-secret-123"})
        check("set_secret", "err" not in r, r)
        s = invoke("get_settings")["ok"]
        check("get_settings reports the stored secret (not its value)", s["secrets"]["heavy_api_key"] is True
              and "sk-e2e" not in json.dumps(s), s)
        out = subprocess.run(["secret-tool", "lookup", "service", "ai.jemma", "username", "heavy_api_key"],
                             capture_output=True, text=True)
        check("the secret is in the OS keychain", out.stdout.strip() == "sk-e2e-secret-123", out)
        r = invoke("set_secret", {"name": "Bad Name!", "value": "x"})
        check("invalid secret names are refused", "err" in r, r)
        invoke("set_secret", {"name": "heavy_api_key", "value": ""})
        check("empty value deletes the secret", invoke("get_settings")["ok"]["secrets"]["heavy_api_key"] is False)

    # --- the settings page renders inside the app's webview with the keychain state (screenshot); the
    with step('settings page in the webview', 60):
        # tray's Settings… item opens it as its own window, which WebKitWebDriver does not list, so the page is
        # loaded in the chat webview here.
        invoke("set_secret", {"name": "hf_token", "value": "hf_e2e"})
        # While the old page unloads, WebKitWebDriver answers commands with "Callback was not called before the
        # unload event" (NoSuchFrameException) or a stale element: both mean "not there yet", so the waits retry.
        navigating = (NoSuchElementException, NoSuchFrameException, StaleElementReferenceException)
        try:
            d.execute_script("window.location.href = 'settings.html'")
        except NoSuchFrameException:
            pass  # the navigation won the race against the script's reply: it happened all the same
        WebDriverWait(d, 15, ignored_exceptions=navigating).until(
            lambda d: d.find_element(By.ID, "save").is_displayed())
        WebDriverWait(d, 15, ignored_exceptions=navigating).until(
            lambda d: "stored" in d.find_element(By.ID, "hf-token-state").text)
        check("settings page shows stored secrets without their values",
              "hf_e2e" not in d.page_source, d.find_element(By.ID, "hf-token-state").text)
        d.save_screenshot(str(SHOTS / "settings-window.png"))
    print(f"{passed} passed, 0 failed", flush=True)
finally:
    # Closing the session can hang like any other command: bounded, and the process group dies regardless.
    if d is not None:
        try:
            with step("close the WebDriver session", 15):
                d.quit()
        except SystemExit as e:
            log(f"{e} (the driver's process group is killed instead)")
    if drv is not None:
        drv.kill()
    if peer.poll() is None:
        peer.kill()
