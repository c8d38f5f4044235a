"""The chat page as the gateway serves it to a phone or browser on the tailnet: a real `jemma serve` (the tiny
fixture model with vision and audio towers, fixtures/tiny-mm) that requires an API key of every caller, and a
real browser engine (WebKitGTK's MiniBrowser under WebKitWebDriver) that opens `/`, is asked for the key, is
refused a wrong one, chats with the right one, and attaches an image, an audio clip and a video that the model
sees and hears (their soft tokens are in the prompt). Run by scripts/test-app.sh inside its Xvfb session, after the app's
own test.

Env: JEMMA_BIN (the jemma binary), JEMMA_ROOT, SHOTS (screenshot dir); deadlines as in harness.py.
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from selenium.webdriver.webkitgtk.options import Options
from selenium.webdriver.webkitgtk.service import Service

sys.path.insert(0, os.path.dirname(__file__))
from harness import free_port, log, routing_badges, step  # noqa: E402

ROOT = pathlib.Path(os.environ.get("JEMMA_ROOT", pathlib.Path(__file__).resolve().parents[2]))
BIN = os.environ.get("JEMMA_BIN", str(ROOT / "target/debug/jemma"))
SHOTS = pathlib.Path(os.environ.get("SHOTS", "."))
MINIBROWSER = "/usr/lib/x86_64-linux-gnu/webkit2gtk-4.1/MiniBrowser"
KEY = "jm-web-e2e-key"
passed = 0


def check(name, cond, detail=""):
    global passed
    if not cond:
        raise SystemExit(f"FAIL {name}: {detail}")
    passed += 1
    log(f"ok: {name}")


def status_of(url, data=None):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def main():
    work = pathlib.Path(tempfile.mkdtemp())
    cfg = work / "jemma.toml"
    cfg.write_text(
        "[auth]\nexempt_loopback = false\n"
        f"keys = [\"{KEY}\"]\nkeys_file = \"{work / 'keys.json'}\"\n"
        "[rate_limits]\ntext_per_minute = 0\n"
        f"[tiers.fast]\nmodel = \"{ROOT / 'fixtures/tiny-mm'}\"\n")
    env = dict(os.environ, JEMMA_LOG="warn")
    env.pop("JEMMA_CONFIG", None)
    env.pop("JEMMA_PORT", None)
    server = subprocess.Popen([BIN, "serve", "--config", str(cfg), "--port", "0"], stdout=subprocess.PIPE,
                              stderr=sys.stderr, env=env, start_new_session=True)
    driver = d = None
    try:
        with step("web: jemma serve requiring keys", 60):
            line = server.stdout.readline().decode()
            url = line.strip().rsplit(" ", 1)[-1]
            check("web: gateway listening", url.startswith("http://"), line)
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as r:
                        if json.load(r)["tiers"]["fast"]["backend"]["state"] == "ready":
                            break
                except OSError:
                    pass
        check("web: the page is open without a key", status_of(url + "/") == 200)
        check("web: the API is not",
              status_of(url + "/v1/chat/completions", b'{"messages":[{"role":"user","content":"hi"}]}') == 401)

        with step("web: WebKitGTK session", 90):
            opts = Options()
            opts.binary_location = MINIBROWSER
            opts.add_argument("--automation")
            port = free_port()
            driver = Service(executable_path="/usr/bin/WebKitWebDriver", port=port)
            d = webdriver.WebKitGTK(options=opts, service=driver)
            d.set_page_load_timeout(30)
            d.set_script_timeout(30)

        with step("web: the page asks for a key", 60):
            d.get(url + "/")
            WebDriverWait(d, 30).until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
            check("web: the page talks to the gateway that served it",
                  d.execute_script("return document.body.dataset.gateway") == url,
                  d.execute_script("return document.body.dataset.gateway"))

        with step("web: a wrong key is refused", 60):
            # The hint changes once the gateway has answered the retried call; then it must say why.
            first_hint = d.find_element(By.ID, "key-hint").text
            d.find_element(By.ID, "api-key").send_keys("not-the-key")
            d.find_element(By.ID, "save-key").click()
            WebDriverWait(d, 30).until(
                lambda d: d.find_element(By.ID, "key-form").is_displayed()
                and d.find_element(By.ID, "key-hint").text != first_hint)
            hint = d.find_element(By.ID, "key-hint").text
            check("web: told the key was not accepted", "not accepted" in hint, hint)

        with step("web: chat with the right key", 120):
            d.find_element(By.ID, "api-key").send_keys(KEY)
            d.find_element(By.ID, "save-key").click()
            WebDriverWait(d, 30).until(lambda d: not d.find_element(By.ID, "key-form").is_displayed())
            d.find_element(By.ID, "prompt").send_keys("Hello from a phone")
            d.find_element(By.ID, "send").click()
            routing = WebDriverWait(d, 90).until(routing_badges)[0]["routing"]
            check("web: streamed reply with a routing badge",
                  routing["tier"] == "fast" and routing["completion_tokens"] >= 1, routing)
            stored = d.execute_script("return localStorage.getItem('jemma.chat.apiKey')")
            check("web: the key stays in this browser's storage", stored == KEY, stored)
            check("web: and never in a cookie", KEY not in (d.execute_script("return document.cookie") or ""))
            SHOTS.mkdir(parents=True, exist_ok=True)
            d.save_screenshot(str(SHOTS / "web-chat.png"))

        with step("web: an image, an audio clip and a video attached, seen and heard", 120):
            # The fixture's own PNG (12 soft tokens in this tower), WAV (0.9 s: 23 soft tokens) and a 4 s MP4
            # (the fast tier samples 4 frames of 2 soft tokens, and its 4 s of sound: 100).
            d.find_element(By.ID, "attach").send_keys("\n".join(str(ROOT / f) for f in (
                "fixtures/tiny-mm/photo.png", "fixtures/tiny-mm/speech.wav", "fixtures/video/clip.mp4")))
            WebDriverWait(d, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#attachments .thumb")) == 3)
            check("web: the attachments are shown before sending",
                  len(d.find_elements(By.CSS_SELECTOR, "#attachments .thumb.audio")) == 1
                  and len(d.find_elements(By.CSS_SELECTOR, "#attachments .thumb.video")) == 1)
            d.find_element(By.ID, "prompt").send_keys("What is in these?")
            d.find_element(By.ID, "send").click()
            second = WebDriverWait(d, 90).until(lambda d: (b := routing_badges(d)) and len(b) >= 2 and b)[1]["routing"]
            shown = d.execute_script("""
                const last = [...document.querySelectorAll('.msg.user')].pop();
                return [last.querySelectorAll('img.msg-image').length,
                        last.querySelectorAll('.msg-audio audio').length,
                        last.querySelectorAll('video.msg-video').length];""")
            check("web: the message shows its image, its clip and its video", shown == [1, 1, 1], shown)
            # The second prompt holds the first turn too; beyond it, the image's 12 + 2 tokens, the clip's
            # 23 + 2, the video's 4 frames of 2 + 2 and its sound's 100 + 2: the model was shown them all, not
            # their placeholders alone.
            grown = second["prompt_tokens"] - routing["prompt_tokens"]
            check("web: the soft tokens of the image, the clip and the video reached the model",
                  second["tier"] == "fast" and grown >= 14 + 25 + 16 + 102, (routing, second))
            d.save_screenshot(str(SHOTS / "web-chat-media.png"))
    finally:
        if d is not None:
            try:
                d.quit()
            except Exception:  # noqa: BLE001 - tearing down a session that may be gone
                pass
        server.kill()
        server.wait(timeout=10)
    log(f"web chat page: {passed} passed, 0 failed")


if __name__ == "__main__":
    main()
