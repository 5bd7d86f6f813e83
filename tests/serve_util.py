"""Start `mixres serve` for real on 127.0.0.1 (a free port) in a subprocess, and make test images."""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # the only address these tests ever talk to


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, key: str | None):
        self.proc, self.port, self.key = proc, port, key
        self.url = f"http://{HOST}:{port}"
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def post(self, images: list[bytes], **extra) -> httpx.Response:
        return self.client.post("/v1/embeddings", json={"input": [data_uri(b) for b in images], **extra})

    def metric(self, name: str, **labels) -> float:
        """The value of one Prometheus sample (0 when absent)."""
        text = self.client.get("/metrics").text
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def decode_workers(self) -> list[int]:
        """pids of the decoding worker processes (the spawned children, not the resource tracker)."""
        out = []
        for pid in _children(self.proc.pid):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmd:
                out.append(pid)
        return sorted(out)


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


@contextmanager
def running_server(*args: str, key: str | None = None, ready_timeout: float = 180, env: dict | None = None):
    port = free_port()
    cmd = [sys.executable, "-m", "mixres", "serve", "--host", HOST, "--port", str(port), "--log-level",
           "warning", *args]
    if key:
        cmd += ["--api-key", key]
    # set here, the server does not restart itself to set it (one test checks that it does)
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = Server(proc, port, key)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {proc.stdout.read().decode()[-3000:]}")
            try:
                if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready in time")
            time.sleep(0.2)
        yield server
    finally:
        server.client.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_bytes(h: int, w: int, fmt: str = "PNG", mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def error_line(resp: httpx.Response) -> str:
    """The one-line message of an error answer (and check it is one line)."""
    msg = resp.json()["error"]["message"]
    assert "\n" not in msg and msg.strip() == msg, msg
    return msg
