"""`mixres serve` on 127.0.0.1: each image's embedding equals the image encoded alone, whatever
it was packed with; the OpenAI wire format, the multipart route, the probes and the metrics."""

import base64
import functools
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel_err
from serve_util import data_uri, error_line, image_bytes, running_server

import mixres

KEY = "test-key"
MODEL = "tiny-vit"
MAX_IMAGE_TOKENS = 256
TOL = 1e-5

# (h, w, format, mode): different sizes, aspect ratios, formats and modes
SHAPES = [(64, 64, "PNG", "RGB"), (48, 160, "JPEG", "RGB"), (200, 40, "WEBP", "RGB"), (96, 72, "PNG", "RGBA"),
          (33, 250, "PNG", "L"), (128, 128, "JPEG", "RGB"), (20, 20, "GIF", "P"), (300, 180, "PNG", "RGB"),
          (75, 90, "WEBP", "RGB"), (160, 48, "PNG", "LA")]


@pytest.fixture(scope="module")
def server():
    with running_server("--model", MODEL, "--max-image-tokens", str(MAX_IMAGE_TOKENS), "--max-batch-tokens",
                        "1024", "--max-wait-ms", "20", "--decode-workers", "1", "--max-request-images", "16",
                        "--max-request-bytes", "2000000", "--max-pixels", "250000", key=KEY) as s:
        yield s


@functools.cache
def _encoder():
    return mixres.load_encoder(MODEL, max_image_tokens=MAX_IMAGE_TOKENS)


def alone(data: bytes, pool: str | None = None):
    """The reference: the image encoded by itself through the library."""
    f = mixres.encode([data], model=_encoder(), pool=pool)
    return f.tokens, (None if f.pooled is None else f.pooled[0]), f.grid_hw[0].tolist()


def test_each_image_equals_the_image_alone_under_concurrency(server):
    images = [image_bytes(h, w, fmt, mode, seed=i) for i, (h, w, fmt, mode) in enumerate(SHAPES)]
    # 12 clients at once, each with 1-4 of the images in its own order
    requests = [[(k + j * 3) % len(images) for j in range(1 + k % 4)] for k in range(12)]
    batches_before = server.metric("mixres_batches_total")

    def call(idx):
        r = server.post([images[i] for i in idx], return_tokens=True, encoding_format="float")
        assert r.status_code == 200, r.text
        return r.json()

    def bad(k):  # unreadable images sent at the same time cost only their own requests
        r = server.post([images[k], _png_truncated()])
        assert r.status_code == 400 and "input[1]" in error_line(r)

    with ThreadPoolExecutor(15) as pool:
        bad_runs = [pool.submit(bad, k) for k in range(3)]
        answers = list(pool.map(call, requests))
        for f in bad_runs:
            f.result()
    refs = [alone(b) for b in images]
    n_images = 0
    for idx, ans in zip(requests, answers):
        assert [d["index"] for d in ans["data"]] == list(range(len(idx)))
        for i, d in zip(idx, ans["data"]):
            tokens, pooled, grid = refs[i]
            assert d["grid"] == grid
            assert rel_err(torch.tensor(d["tokens"]), tokens) <= TOL
            assert rel_err(torch.tensor(d["embedding"]), pooled) <= TOL
            n_images += 1
        assert ans["usage"]["prompt_tokens"] == sum(refs[i][2][0] * refs[i][2][1] for i in idx)
    # the images were packed together: fewer forwards than images
    assert server.metric("mixres_batches_total") - batches_before < n_images
    # the decoding worker that made them runs at nice 19 (it takes the gaps the forward
    # leaves), the server itself at 0
    def nice(pid):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])

    assert [nice(pid) for pid in server.decode_workers()] == [19] and nice(server.proc.pid) == 0


def test_pool_normalize_and_base64(server):
    data = image_bytes(70, 140, "PNG", seed=3)
    r = server.post([data], pool="mean", normalize=True, encoding_format="base64")
    assert r.status_code == 200, r.text
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    ref = torch.nn.functional.normalize(alone(data, pool="mean")[1], dim=-1)
    assert rel_err(torch.from_numpy(vec.copy()), ref) <= TOL


def test_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    data = [image_bytes(64, 96, "JPEG", seed=5), image_bytes(120, 40, "PNG", seed=6)]
    out = client.embeddings.create(model=MODEL, input=[data_uri(b) for b in data])  # base64 on the wire
    for b, e in zip(data, out.data):
        assert rel_err(torch.tensor(e.embedding), alone(b)[1]) <= TOL
    assert [m.id for m in client.models.list().data] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).embeddings.create(
            model=MODEL, input=[data_uri(data[0])])


def test_multipart_upload(server):
    a, b = image_bytes(80, 50, "JPEG", seed=7), image_bytes(40, 90, "PNG", seed=8)
    r = server.client.post("/v1/embeddings/upload", files=[("image", ("a.jpg", a)), ("image", ("b.png", b))],
                           data={"return_tokens": "true"})
    assert r.status_code == 200, r.text
    for raw, d in zip([a, b], r.json()["data"]):
        tokens, pooled, grid = alone(raw)
        assert d["grid"] == grid and rel_err(torch.tensor(d["embedding"]), pooled) <= TOL


def test_probes_models_and_metrics(server):
    assert server.client.get("/health").json() == {"status": "ok"}
    assert server.client.get("/ready").status_code == 200
    assert server.client.get("/v1/models").json()["data"][0]["id"] == MODEL
    text = server.client.get("/metrics").text
    for name in ("mixres_requests_total", "mixres_images_total", "mixres_tokens_total", "mixres_batch_fill",
                 "mixres_queue_tokens", "mixres_request_seconds_bucket", "mixres_queue_wait_seconds"):
        assert name in text


def _png_truncated() -> bytes:
    data = image_bytes(120, 120, "PNG", seed=9)
    return data[: len(data) // 2]  # the header (and its size) intact, the pixel data cut


def _bomb() -> bytes:  # 600 x 600 = 360000 pixels over --max-pixels 250000, a few hundred bytes
    buf = io.BytesIO()
    from PIL import Image

    Image.new("1", (600, 600)).save(buf, "PNG")
    return buf.getvalue()


GOOD = image_bytes(32, 32, "PNG", seed=10)
GOOD_URI = data_uri(GOOD)

# name -> (request body (a dict, or raw bytes sent as JSON), status, words the one line must hold)
BAD = {
    "truncated PNG": ({"input": [GOOD_URI, data_uri(_png_truncated())]}, 400, ["input[1]", "truncated"]),
    "not an image": ({"input": [data_uri(b"hello, not an image")]}, 400, ["input[0]"]),
    "bad base64": ({"input": [GOOD_URI, "data:image/png;base64,@@@@"]}, 400, ["input[1]", "base64"]),
    "data URI not base64": ({"input": ["data:image/png,rawbytes"]}, 400, ["input[0]", "base64"]),
    "URL": ({"input": ["https://example.com/cat.jpg"]}, 400, ["input[0]", "URLs are not fetched"]),
    "a path on the server": ({"input": [os.path.abspath(__file__)]}, 400, ["input[0]"]),
    "bomb": ({"input": [data_uri(_bomb())]}, 400, ["input[0]", "too large"]),
    "malformed JSON": (b'{"input": [', 400, ["not valid JSON"]),
    "wrong type": ({"input": [GOOD_URI, 42]}, 422, ["input[1]"]),
    "unknown field": ({"input": [GOOD_URI], "dimension": 3}, 422, ["dimension", "unknown field"]),
    "bad encoding_format": ({"input": [GOOD_URI], "encoding_format": "int8"}, 422, ["encoding_format"]),
    "empty input": ({"input": []}, 422, ["input"]),
    "too many images": ({"input": [GOOD_URI] * 17}, 413, ["17 images", "--max-request-images 16"]),
    "too many bytes": ({"input": [GOOD_URI, "A" * 2_100_000]}, 413, ["--max-request-bytes"]),
    "wrong model": ({"input": [GOOD_URI], "model": "gpt-4"}, 404, ["gpt-4", MODEL]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_the_server_keeps_serving(server, case):
    body, status, words = BAD[case]
    workers = server.decode_workers()
    if isinstance(body, bytes):
        r = server.client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    else:
        r = server.client.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    line = error_line(r)
    for w in words:
        assert w in line, line
    # nothing else is lost: the next request is served, by the same decoding workers
    assert server.post([GOOD]).status_code == 200
    assert server.decode_workers() == workers
    assert server.client.get("/ready").status_code == 200


def test_api_key(server):
    import httpx

    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        r = httpx.post(f"{server.url}/v1/embeddings", json={"input": [GOOD_URI]}, headers=headers)
        assert r.status_code == 401 and "API key" in error_line(r)
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes stay open


def test_a_dead_decoding_worker_is_replaced(server):
    before = server.decode_workers()
    assert before
    for pid in before:
        os.kill(pid, 9)
    r = server.post([GOOD, image_bytes(50, 70, "JPEG", seed=11)])
    assert r.status_code == 200, r.text
    after = server.decode_workers()
    assert after and not set(after) & set(before)
    assert server.metric("mixres_decode_workers_replaced_total") >= 1
