"""A minimal headless-Chromium driver over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ending in NUL on fds 3/4), so the browser
test needs no Python package beyond the standard library and Debian's ``chromium``."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _high(fd: int) -> int:
    """The same pipe end on a descriptor number >= 10 (the original is closed)."""
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


def _save_png(data: str, path: str | Path) -> Path:
    """Write a base64 PNG from Page.captureScreenshot to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(data))
    return path


class Chromium:
    """One headless browser with one page; ``send`` runs a DevTools command on the page."""

    def __init__(self, binary: str | None = None, width: int = 1280, height: int = 900):
        binary = binary or find_chromium()
        if binary is None:
            raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        cmd_r, self._cmd_w = os.pipe()  # we write commands; the browser reads fd 3
        self._out_r, out_w = os.pipe()  # the browser writes fd 4; we read
        cmd_r, out_w = (_high(cmd_r), _high(out_w))  # so dup2 onto 3/4 clobbers neither

        def child_fds():
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"], pass_fds=(3, 4), preexec_fn=child_fds,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._next = 0
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.width, self.height = width, height
        self.session: str | None = None

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._out_r, 65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, page: bool = True,
             timeout: float = 30.0) -> dict:
        """Run a DevTools command (on the page unless page=False); its result or an error."""
        with self._cond:
            self._next += 1
            msg_id = self._next
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if page and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        with self._cond:
            while msg_id not in self._replies:
                left = deadline - time.time()
                if left <= 0:
                    raise TimeoutError(f"no reply to {method} within {timeout} s")
                self._cond.wait(left)
            reply = self._replies.pop(msg_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str) -> None:
        """Open ``url`` in a new page and attach to it."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, page=False)
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target["targetId"], "flatten": True},
                                 page=False)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1,
                   "mobile": False})
        self.send("Page.navigate", {"url": url})

    def js(self, expression: str):
        """Evaluate JavaScript in the page; its (JSON) value."""
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error: {res['exceptionDetails'].get('text')}: {expression}")
        return res["result"].get("value")

    def wait(self, expression: str, timeout: float = 60.0, every: float = 0.25):
        """Poll a JS expression until it is truthy; return its value."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(every)
        raise TimeoutError(f"timed out after {timeout} s waiting for: {expression}")

    def click_text(self, selector: str, text: str) -> None:
        """Click the first element matching ``selector`` whose text is ``text``."""
        found = self.js(f"""(() => {{ const el = [...document.querySelectorAll({json.dumps(selector)})]
            .find(e => e.textContent.trim() === {json.dumps(text)});
            if (el) {{ el.click(); return true; }} return false; }})()""")
        if not found:
            raise LookupError(f"no {selector} with text {text!r}")

    def click(self, selector: str) -> None:
        """Click the first element matching a CSS selector."""
        if not self.js(f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
                       " if (el) { el.click(); return true; } return false; })()"):
            raise LookupError(f"nothing matches {selector}")

    def mouse_click(self, selector: str) -> None:
        """A real mouse click (press and release) at the centre of the first match, for
        widgets that open on pointer events rather than on ``el.click()``."""
        box = self.js(f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
                      " if (!el) return null; el.scrollIntoView({block: 'center'});"
                      " const r = el.getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if not box:
            raise LookupError(f"nothing matches {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1],
                                                   "button": "left", "clickCount": 1})

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        """Save a PNG of the page (the whole page height when full_page)."""
        height = self.height
        if full_page:
            height = int(self.js("document.documentElement.scrollHeight") or self.height)
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": self.width, "height": height, "deviceScaleFactor": 1,
                       "mobile": False})
            time.sleep(0.5)
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        if full_page:
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": self.width, "height": self.height, "deviceScaleFactor": 1,
                       "mobile": False})
        return _save_png(data, path)

    def screenshot_of(self, path: str | Path, element: str, pad: int = 24) -> Path:
        """Save a PNG of the page region around ``element`` (a JS expression), wherever it
        is on the page (no scrolling, so polling updates cannot move it out of view)."""
        r = self.js(f"(() => {{ const r = ({element}).getBoundingClientRect(); return "
                    "[r.left + scrollX, r.top + scrollY, r.width, r.height]; })()")
        x, y = max(0, r[0] - pad), max(0, r[1] - pad)
        clip = {"x": x, "y": y, "width": min(self.width - x, r[2] + 2 * pad),
                "height": r[3] + 2 * pad, "scale": 1}
        data = self.send("Page.captureScreenshot", {"format": "png", "clip": clip,
                                                    "captureBeyondViewport": True})["data"]
        return _save_png(data, path)

    def close(self) -> None:
        try:
            self.send("Browser.close", page=False, timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
