"""A real headless Chromium, driven over the DevTools protocol, for checking HTML reports.

`render(path)` opens a file as a user would, records every network request the page makes,
reads each <img> element's decoded size and place from the DOM, and takes a screenshot of the
whole page. Chromium is Debian's `chromium` package (.ci/run installs it when missing).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tests.shared import require, unavailable

IMAGES_JS = """JSON.stringify(Array.from(document.images).map(i => {
  const r = i.getBoundingClientRect();
  return {alt: i.alt, cls: i.className, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
          box: [r.left + window.scrollX, r.top + window.scrollY, r.right + window.scrollX, r.bottom + window.scrollY]};
}))"""


@dataclass
class Rendered:
    images: list[dict]  # per <img>: alt, cls, complete, width/height (natural), box (page pixels)
    requests: list[str]  # every URL the page asked for, the document's own included
    screenshot: Image.Image  # the whole page
    text: str  # document.body.innerText

    def crop(self, image: dict) -> Image.Image:
        return self.screenshot.crop(tuple(round(v) for v in image["box"])).convert("RGB")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        unavailable("needs a Chromium browser (Debian: apt-get install chromium; .ci/run installs it)")
    return found


class DevTools:
    """One page target's DevTools connection: commands in order, events kept."""

    def __init__(self, url: str) -> None:
        websocket = require("websocket", extra="dev")
        self.ws = websocket.create_connection(url, timeout=30)
        self.events: list[dict] = []
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {timeout}s")
            self.events.append(json.loads(self.ws.recv()))


@contextmanager
def page(width: int = 1400) -> Iterator[DevTools]:
    """A headless Chromium with one blank page, driven over DevTools; stopped on leaving."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
             f"--window-size={width},900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # a group: stop_group
        )  # fmt: skip
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("chromium did not start its DevTools server")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            tools = DevTools(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
            tools.call("Network.enable")
            tools.call("Page.enable")
            try:
                yield tools
            finally:
                tools.ws.close()
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a process and every helper in its process group: Chromium's renderers and crash handler
    outlive their parent for a moment and keep writing to the profile that is about to be removed."""
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)  # ProcessLookupError once the last one is gone
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def evaluate(tools: DevTools, expression: str):
    """The value of a JavaScript expression in the page."""
    return tools.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)["result"].get("value")


def render(path: Path, width: int = 1400) -> Rendered:
    """Open `path` in headless Chromium and report what it decoded, requested and showed."""
    with page(width) as tools:
        tools.call("Page.navigate", url=path.resolve().as_uri())
        tools.wait_for("Page.loadEventFired")
        images = json.loads(evaluate(tools, IMAGES_JS))
        text = evaluate(tools, "document.body.innerText")
        shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        requests = [e["params"]["request"]["url"] for e in tools.events if e.get("method") == "Network.requestWillBeSent"]
    return Rendered(images, requests, Image.open(io.BytesIO(base64.b64decode(shot["data"]))), text)
