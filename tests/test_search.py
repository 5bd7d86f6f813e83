"""Search what you embedded, over HTTP: a real server on 127.0.0.1 over a folder `mixres embed` made.

The folder is webdataset shards of generated photos with `.txt` captions, so queries, keys,
metadata columns and thumbnails read from inside a tar all go through the running server.
"""

import base64
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from mixres.workloads import write_photos

MODEL = "tiny-clip"
# `mixres serve --index` where the server is (queries packed by its engine), else search's own server
SERVER = (["-m", "mixres", "serve"] if importlib.util.find_spec("mixres.serve")
          else ["-m", "mixres.search.app"])
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(folder, *extra, model=MODEL):
    """The search server as a user starts it; yields (base url, the process, its stderr file)."""
    port = _free_port()
    log = folder.parent / f"server-{port}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, *SERVER, "--model", model, "--index", str(folder),
                                 "--port", str(port), *extra],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise AssertionError(f"the server did not start: {log.read_text()[-2000:]}")
        yield url, proc, log
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two .tar shards of 10 photos (sizes and modes vary), each with a caption; key -> image bytes."""
    root = tmp_path_factory.mktemp("search")
    photos = write_photos(root / "photos", n=10, seed=3)
    images = {}
    (root / "shards").mkdir()
    for s in range(2):
        with tarfile.open(root / "shards" / f"{s:05d}.tar", "w") as tf:
            for p in photos[s * 5:(s + 1) * 5]:
                for ext, data in ((p.suffix[1:], p.read_bytes()), ("txt", f"caption of {p.stem}".encode())):
                    info = tarfile.TarInfo(f"{p.stem}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                images[f"{s:05d}.tar/{p.stem}"] = p.read_bytes()
    return root, images


@pytest.fixture(scope="module")
def folder(shards):
    root, _ = shards
    r = subprocess.run([sys.executable, "-m", "mixres", "embed", str(root / "shards"), "--model", MODEL,
                        "--out", str(root / "feats"), "--num-workers", "0", "--no-progress"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return root / "feats"


@pytest.fixture(scope="module")
def server(folder):
    with serve(folder) as (url, proc, log):
        yield url


def caption(metadata: dict) -> str:
    """A tar sample's .txt: its `txt` column, or `caption` where embed names it so."""
    return metadata.get("caption", metadata.get("txt"))


def one_line(r: httpx.Response) -> str:
    """The error's message (OpenAI's error shape, as every route of the server answers)."""
    err = r.json()["error"]
    assert err["code"] == r.status_code and err["type"]
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"], err
    return err["message"]


def data_uri(data: bytes) -> str:
    kind = Image.open(io.BytesIO(data)).format.lower()
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def test_every_indexed_image_sent_as_a_query_comes_back_first(server, shards):
    _, images = shards
    for n, (key, data) in enumerate(images.items()):
        # data URIs and bare base64 alike
        query = data_uri(data) if n % 2 else base64.b64encode(data).decode()
        r = httpx.post(f"{server}/v1/search", json={"input": query, "k": 3}, timeout=60)
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["object"] == "list" and res["model"]
        first = res["data"][0]
        assert first["key"] == key and first["rank"] == 0, (key, res["data"])
        assert first["score"] >= 0.999
        assert caption(first["metadata"]) == f"caption of {key.split('/')[1]}"  # the source's own column
        assert [d["rank"] for d in res["data"]] == [0, 1, 2]
        assert all(a["score"] >= b["score"] for a, b in zip(res["data"], res["data"][1:]))


def test_a_burst_of_concurrent_searches_each_finds_its_own_image(server, shards):
    from concurrent.futures import ThreadPoolExecutor

    _, images = shards

    def first_key(data: bytes) -> tuple[str, float]:
        r = httpx.post(f"{server}/v1/search", json={"input": data_uri(data), "k": 1}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["key"], r.json()["data"][0]["score"]

    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(images, pool.map(first_key, images.values())))
    assert all(key == found and score >= 0.999 for key, (found, score) in got.items()), got


def test_a_key_query_returns_that_item_first(server, shards):
    _, images = shards
    for key in list(images)[::3]:
        r = httpx.post(f"{server}/v1/search", json={"key": key, "k": 20}, timeout=60)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data[0]["key"] == key and data[0]["score"] >= 0.999
        assert len(data) == len(images)  # k above the folder's size: every item once
        assert len({d["id"] for d in data}) == len(images)


def test_thumbnails_are_read_from_inside_the_tar_and_resized(server, shards):
    _, images = shards
    key, data = next((k, v) for k, v in images.items() if max(Image.open(io.BytesIO(v)).size) > 256)
    hit = httpx.post(f"{server}/v1/search", json={"key": key, "k": 1}, timeout=60).json()["data"][0]
    r = httpx.get(f"{server}/v1/items/{hit['id']}/thumbnail", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb, orig = Image.open(io.BytesIO(r.content)), Image.open(io.BytesIO(data))
    assert max(thumb.size) == 256
    assert abs(thumb.size[0] / thumb.size[1] - orig.size[0] / orig.size[1]) < 0.05
    item = httpx.get(f"{server}/v1/items/{hit['id']}", timeout=60).json()
    assert item["key"] == key and caption(item["metadata"]).startswith("caption of")


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()[:60]  # a valid header, then nothing


BAD_SEARCHES = [
    ("not json", b"{nope", 400),
    ("a list", b"[]", 422),
    ("neither input nor key", json.dumps({"k": 3}).encode(), 422),
    ("both input and key", json.dumps({"input": "aGk=", "key": "x"}).encode(), 422),
    ("input not a string", json.dumps({"input": 5}).encode(), 422),
    ("input not base64", json.dumps({"input": "!!! not base64 !!!"}).encode(), 400),
    ("data URI not base64", json.dumps({"input": "data:image/png,abc"}).encode(), 400),
    ("not an image", json.dumps({"input": base64.b64encode(b"plain text, no image").decode()}).encode(), 400),
    ("truncated PNG", json.dumps({"input": base64.b64encode(_truncated_png()).decode()}).encode(), 400),
    ("unknown key", json.dumps({"key": "no/such/key"}).encode(), 404),
    ("key not a string", json.dumps({"key": 3}).encode(), 422),
    ("k zero", json.dumps({"key": "x", "k": 0}).encode(), 422),
    ("k too large", json.dumps({"key": "x", "k": 1001}).encode(), 422),
    ("k a string", json.dumps({"key": "x", "k": "3"}).encode(), 422),
    ("k a bool", json.dumps({"key": "x", "k": True}).encode(), 422),
]


@pytest.mark.parametrize("what,body,status", BAD_SEARCHES, ids=[b[0] for b in BAD_SEARCHES])
def test_bad_searches_get_their_status_and_one_line(server, shards, what, body, status):
    r = httpx.post(f"{server}/v1/search", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == status, (what, r.text)
    one_line(r)
    key = next(iter(shards[1]))
    still = httpx.post(f"{server}/v1/search", json={"key": key}, timeout=60)
    assert still.status_code == 200  # the server keeps serving


@pytest.mark.parametrize("item", ["10", "999999", "-1", "abc", "1e3", "..%2F..%2Fetc%2Fpasswd",
                                  "%2Fetc%2Fpasswd"])
def test_thumbnails_of_ids_not_in_the_index_are_404(server, item):
    r = httpx.get(f"{server}/v1/items/{item}/thumbnail", timeout=60)
    assert r.status_code == 404, r.text
    if "%2F" in item:  # the path has more segments: no route at all, the app's own 404
        assert "\n" not in r.text
    else:
        assert "not in the index" in one_line(r)


def test_a_body_over_the_limit_is_413(server):
    from mixres.search.api import MAX_BODY_BYTES

    r = httpx.post(f"{server}/v1/search", content=b"x" * (MAX_BODY_BYTES + 1), timeout=120)
    assert r.status_code == 413 and "limit" in one_line(r)


def test_restart_loads_the_cached_index_and_the_api_key_covers_the_routes(folder, shards, server):
    key = next(iter(shards[1]))
    cached = sorted((folder / "search").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in cached]
    with serve(folder, "--api-key", "s3cret") as (url, _, log):
        assert "loaded from its cache" in log.read_text()
        assert [p.stat().st_mtime_ns for p in sorted((folder / "search").iterdir())] == mtimes
        assert httpx.get(f"{url}/", timeout=30).status_code == 200  # the page asks for the key itself
        for auth in ({}, {"Authorization": "Bearer wrong"}):
            for method, path, body in (("POST", "/v1/search", {"key": key}), ("GET", "/v1/index", None),
                                       ("GET", "/v1/items/0", None), ("GET", "/v1/items/0/thumbnail", None)):
                r = httpx.request(method, f"{url}{path}", json=body, headers=auth, timeout=30)
                assert r.status_code == 401 and "API key" in one_line(r), (path, auth, r.text)
        ok = {"Authorization": "Bearer s3cret"}
        r = httpx.post(f"{url}/v1/search", json={"key": key, "k": 1}, headers=ok, timeout=30)
        assert r.status_code == 200 and r.json()["data"][0]["key"] == key
        assert httpx.get(f"{url}/v1/items/0/thumbnail", headers=ok, timeout=30).status_code == 200
        _the_page_asks_for_the_key_once(url, shards[1], folder.parent)
    r = subprocess.run([sys.executable, "-m", "mixres", "verify", str(folder)], env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr  # verify expects search/


def _the_page_asks_for_the_key_once(url: str, images: dict, tmp: Path) -> None:
    from playwright.sync_api import sync_playwright

    key, upload = _query_file(images, 2, tmp)
    other_key, other = _query_file(images, 7, tmp)
    with sync_playwright() as pw:
        browser, page, prompts = _open_page(pw, url, api_key="s3cret")
        try:
            _upload(page, upload, key)
            _upload(page, other, other_key)
            assert len(prompts) == 1 and "API key" in prompts[0]  # asked once, kept for the tab
        finally:
            browser.close()


def test_a_folder_of_another_model_is_refused_in_one_line_at_start(folder):
    r = subprocess.run([sys.executable, *SERVER, "--model", "tiny-vit", "--index", str(folder),
                        "--port", str(_free_port())],
                       env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "made with another model, layer or pooling" in lines[0], r.stderr
    assert "model_class" in lines[0] and MODEL in lines[0]


def _open_page(pw, url: str, api_key: str | None = None):
    """Headless Chromium on the page; answers the page's one prompt for the API key."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    prompts = []

    def answer(dialog):
        prompts.append(dialog.message)
        dialog.accept(api_key) if api_key else dialog.dismiss()

    page.on("dialog", answer)
    page.goto(f"{url}/")
    page.wait_for_function("document.getElementById('info').textContent.includes('items')")
    return browser, page, prompts


def _upload(page, path: Path, key: str) -> None:
    page.set_input_files("#file", str(path))
    page.wait_for_function(f"(document.querySelector('#results .item') || {{dataset: {{}}}}).dataset.key"
                           f" === {key!r}", timeout=60_000)
    assert float(page.locator("#results .item .score").first.inner_text()) >= 0.999
    page.wait_for_function("() => { const im = [...document.querySelectorAll('#results .item img')];"
                           " return im.length && im.every(i => i.complete && i.naturalWidth > 0); }",
                           timeout=60_000)


def _query_file(images: dict, n: int, folder: Path) -> tuple[str, Path]:
    key, data = list(images.items())[n]
    path = folder / f"{key.split('/')[1]}.{Image.open(io.BytesIO(data)).format.lower()}"
    path.write_bytes(data)
    return key, path


def test_the_page_finds_an_uploaded_image_first(server, shards, tmp_path):
    from playwright.sync_api import sync_playwright

    key, upload = _query_file(shards[1], 6, tmp_path)
    with sync_playwright() as pw:
        browser, page, prompts = _open_page(pw, server)
        try:
            other_hosts = []
            ours = (server, f"blob:{server}/", "data:")  # thumbnails are fetched, then shown as blobs
            page.on("request", lambda req: req.url.startswith(ours) or other_hosts.append(req.url))
            _upload(page, upload, key)  # its own thumbnail first, every thumbnail shown
            page.screenshot(path=str(tmp_path / "search-page.png"), full_page=True)
            if os.environ.get("MIXRES_SCREENSHOT"):  # how docs/search.png is made
                page.screenshot(path=os.environ["MIXRES_SCREENSHOT"], full_page=True)
            # "more like this": clicking the second result puts it first
            second = page.locator("#results .item").nth(1)
            second_key = second.get_attribute("data-key")
            second.click()
            page.wait_for_function(f"document.querySelector('#results .item').dataset.key === {second_key!r}",
                                   timeout=60_000)
            assert other_hosts == [] and prompts == []  # nothing from another host; no key asked
        finally:
            browser.close()
    assert (tmp_path / "search-page.png").stat().st_size > 10_000
