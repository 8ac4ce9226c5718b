"""Headless Chromium (Debian's package), driven over the DevTools protocol: a page with a
fake microphone that plays a WAV file, read back through `evaluate`."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

BINARIES = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str | None:
    return next((path for b in BINARIES if (path := shutil.which(b))), None)


class Browser:
    def __init__(self, microphone: Path, profile: Path) -> None:
        binary = chromium()
        assert binary, "install chromium (scripts/run pytest does)"
        self.process = subprocess.Popen(
            [
                binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={microphone}%noloop",
                "--autoplay-policy=no-user-gesture-required", "about:blank",
            ],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stderr is not None
        for line in self.process.stderr:  # it says where DevTools listens, then goes on
            if found := re.search(r"DevTools listening on ws://([^/]+)/", line):
                self.address = found.group(1)
                break
        else:
            raise AssertionError("chromium exited before its DevTools were up")
        # Read the rest of its log, or a full pipe would stall it.
        threading.Thread(target=self.process.stderr.read, daemon=True).start()
        page = next(t for t in httpx.get(f"http://{self.address}/json").json()
                    if t["type"] == "page")  # fmt: skip
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None))
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == n:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float) -> Any:
        """Until `expression` is truthy in the page (looked at every tenth of a second)."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"the page never had {expression}"
            time.sleep(0.1)
        return value

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot")["data"]))

    def close(self) -> None:
        self._stack.close()
        self.process.terminate()
        self.process.wait(timeout=30)
