"""The live dashboard in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by selenium) loads ``/`` while a request streams; the page must show the model name and the
request's streaming text. A screenshot is saved in the test's output folder (and copied to
``$GLLM_TEST_ARTIFACTS`` when that is set)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
API_KEY = "dash-key"


def _browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium is not installed: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="gllm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver, profile


class _Stream(threading.Thread):
    """A streaming completion read on a thread, its text collected as it arrives."""

    def __init__(self, port: int, body: dict) -> None:
        super().__init__(daemon=True)
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.conn.request("POST", "/v1/chat/completions", body=json.dumps(dict(body, stream=True)).encode(),
                          headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        self.text = ""
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            while True:
                line = self.resp.readline()
                if not line:
                    return
                line = line.decode().strip()
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    with self.lock:
                        self.text += choice["delta"].get("content") or ""
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            return                                  # closed by the test

    def close(self) -> None:
        try:
            if self.conn.sock is not None:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()


def test_dashboard_shows_model_and_streaming_text(llama32_dir, tmp_path):
    from gllm.engine import GeneratorParams, LLMEngine
    from gllm.http import HttpFrontEnd

    driver, profile = _browser()
    engine = LLMEngine(llama32_dir, GeneratorParams(max_seq_len=1024, max_batch_size=2, cpu_threads=1), device="cpu")
    front = HttpFrontEnd(engine, "127.0.0.1", 0, api_key=API_KEY)
    stream = None
    try:
        # The frame panel shows whatever status source is registered as "frame" (gllm serve registers the
        # bridge's frame reports there); a stand-in here.
        front.metrics.live.add_source("frame", lambda: {"source": "test stand-in", "frame_ms": 15.9,
                                                        "target_ms": 16.7})
        front.start()
        # The page gets the key from its URL fragment (never sent to the server in the URL).
        driver.get(f"{front.url}/#key={API_KEY}")
        from selenium.webdriver.support.ui import WebDriverWait
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        wait.until(lambda d: d.find_element("id", "model").text == "tiny-llama32")
        assert driver.find_element("id", "device").text == "cpu"
        wait.until(lambda d: "target_ms" in d.find_element("id", "frame").text)

        stream = _Stream(front.port, {"model": "tiny-llama32", "max_tokens": 1000, "ignore_eos": True,
                                      "temperature": 0.8, "seed": 3,
                                      "messages": [{"role": "user", "content": "Sing me the ballad of the mill"}]})
        stream.start()
        script = ("const el = document.querySelector('.req pre.text');"
                  "return el ? [el.closest('.req').dataset.requestId, el.textContent] : null;")
        shown = wait.until(lambda d: (lambda r: r if r and len(r[1]) >= 40 else None)(d.execute_script(script)))
        request_id, page_text = shown
        assert request_id.startswith("chatcmpl-")
        assert "generating" in driver.find_element("css selector", ".req .st").text
        shot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        artifacts = os.environ.get("GLLM_TEST_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(artifacts) / "dashboard.png")
        print(f"dashboard screenshot: {shot}")

        # What the page shows is the text the client is being streamed (the page may be a little ahead).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with stream.lock:
                client_text = stream.text
            if len(client_text) >= len(page_text):
                break
            time.sleep(0.05)
        assert client_text.startswith(page_text), (page_text[:80], client_text[:80])

        # The client leaves: the request disappears from the live list and shows as cancelled.
        stream.close()
        wait.until(lambda d: not d.find_elements("css selector", ".req"))
        wait.until(lambda d: "cancelled" in d.find_element("id", "recent").text)
        assert engine.stats()["kv_free_blocks"] == engine.stats()["kv_total_blocks"]
    finally:
        if stream is not None:
            stream.close()
        driver.quit()
        front.stop()
        engine.close()
        shutil.rmtree(profile, ignore_errors=True)
