"""Deadlines for the app E2E: every step runs under a watchdog that names the step when it hangs, and the
WebDriver session (the first contact with a freshly started WebKit) is created under its own deadline and
retried once with a fresh driver and app process.

Why a watchdog and not only client timeouts: a hang can sit in selenium's HTTP read, in a D-Bus call, or in
a wait loop; SIGALRM interrupts any of them in the main thread, so one mechanism bounds them all. The outer
`timeout` in scripts/test-app.sh is the backstop for a hang outside Python (it reads STEP_FILE to say which
step was running).

Env: JEMMA_E2E_STEP_FILE (where the current step's name is written), JEMMA_E2E_SESSION_TIMEOUT (seconds per
session attempt, default 90), JEMMA_E2E_STEP_SCALE (multiplies every step's deadline, default 1).
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

from selenium import webdriver
from selenium.webdriver.common.options import ArgOptions
from selenium.webdriver.remote.client_config import ClientConfig

STEP_FILE = os.environ.get("JEMMA_E2E_STEP_FILE")
SCALE = float(os.environ.get("JEMMA_E2E_STEP_SCALE", "1"))
SESSION_TIMEOUT = float(os.environ.get("JEMMA_E2E_SESSION_TIMEOUT", "90"))


class StepTimeout(BaseException):
    """A step ran past its deadline. A BaseException, so that no library's `except Exception` swallows it."""


def log(msg):
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _on_alarm(signum, frame):
    raise StepTimeout()


signal.signal(signal.SIGALRM, _on_alarm)
_current = ["start"]


@contextlib.contextmanager
def step(name, seconds):
    """Runs the body under a deadline of `seconds` (times JEMMA_E2E_STEP_SCALE); on expiry the body is
    interrupted and the run fails with `FAIL step '<name>' hung: no progress within N s`. Steps nest: the
    inner deadline applies, and the outer one is restored (minus the time spent) afterwards."""
    limit = seconds * SCALE
    outer_name, outer_left = _current[0], signal.getitimer(signal.ITIMER_REAL)[0]
    t0 = time.monotonic()
    _current[0] = name
    if STEP_FILE:
        with open(STEP_FILE, "w") as f:
            f.write(name + "\n")
    log(f"step: {name} (deadline {limit:.0f} s)")
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    except StepTimeout:
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise SystemExit(f"FAIL step {name!r} hung: no progress within {limit:.0f} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _current[0] = outer_name
        # Between steps the outer bound blames the step that just ended, not an earlier one.
        if STEP_FILE:
            with open(STEP_FILE, "w") as f:
                f.write(f"after {name}\n")
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(0.01, outer_left - (time.monotonic() - t0)))


def routing_badges(d):
    """Every answered turn's routing badge in the chat page, as `{"routing": <its _routing>, "text": <shown>}`,
    read inside the page. While a reply streams the page rebuilds a message's meta line, and WebKitWebDriver fails
    a find whose element is replaced under it ("Could not parse element info"), so no element reference crosses
    the WebDriver boundary here."""
    return [{"routing": json.loads(b["routing"]), "text": b["text"]} for b in d.execute_script(
        "return [...document.querySelectorAll('.msg.assistant .routing-badge')]"
        ".map(b => ({routing: b.dataset.routing, text: b.textContent}))")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Driver:
    """tauri-driver (and below it WebKitWebDriver and the app) in a process group of its own, so that a
    retry or the end of the run kills all three, whatever state they hang in."""

    def __init__(self):
        self.port = free_port()
        native = free_port()
        self.proc = subprocess.Popen(
            ["tauri-driver", "--port", str(self.port), "--native-port", str(native)],
            stdout=sys.stdout, stderr=sys.stderr, start_new_session=True)
        # Both ports: tauri-driver starts WebKitWebDriver on the native port itself, and a session request
        # that reaches tauri-driver before WebKitWebDriver listens is refused at once ("Connection
        # aborted"), which is neither a hang nor the app's fault.
        deadline = time.monotonic() + 20
        waiting = [self.port, native]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"FAIL tauri-driver exited with {self.proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", waiting[0])) == 0:
                    waiting.pop(0)
                    if not waiting:
                        return
                    continue
            time.sleep(0.1)
        self.kill()
        which = "tauri-driver" if waiting[0] == self.port else "WebKitWebDriver (tauri-driver's native driver)"
        raise SystemExit(f"FAIL {which} did not listen within 20 s")

    def kill(self):
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        # WebKitWebDriver starts the app in the same group, but the group leader's death does not reap it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def new_session(app):
    """Starts tauri-driver and opens a WebDriver session on `app`, each attempt under SESSION_TIMEOUT.
    A first attempt that hangs or fails is logged and retried once with a fresh driver and app process;
    the second failure ends the run. Returns (driver process, session)."""
    opts = ArgOptions()
    opts.set_capability("browserName", "wry")
    opts.set_capability("tauri:options", {"application": app})
    for attempt in (1, 2):
        drv = Driver()
        name = f"WebDriver session creation (attempt {attempt} of 2)"
        try:
            with step(name, SESSION_TIMEOUT):
                # The HTTP client's own timeout must outlast the step's deadline, so that a hang is always
                # reported by the step (naming it) rather than by whichever of the two fires first.
                cfg = ClientConfig(remote_server_addr=f"http://127.0.0.1:{drv.port}",
                                   timeout=SESSION_TIMEOUT * SCALE + 30)
                d = webdriver.Remote(command_executor=f"http://127.0.0.1:{drv.port}", options=opts,
                                     client_config=cfg)
                # Every later WebDriver command is bounded by its own step; these make WebKit answer with
                # an error rather than wait forever where the protocol has a timeout of its own.
                d.set_script_timeout(30)
                d.set_page_load_timeout(30)
            return drv, d
        except (SystemExit, Exception) as e:  # noqa: BLE001 - any failure of the first contact is retried
            drv.kill()
            why = str(e) if isinstance(e, SystemExit) else f"FAIL step {name!r}: {type(e).__name__}: {e}"
            if attempt == 2:
                raise SystemExit(why) from None
            log(f"RETRY: {why}; retrying once with a fresh tauri-driver and app process")
