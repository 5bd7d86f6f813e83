"""Ray Serve replicas of the engine on a local Ray: the same API and the same guarantee, each
image's embedding equal to the image encoded alone, whichever replica packed it with what."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import rel_err
from serve_util import HOST, data_uri, free_port, image_bytes

import mixres

MODEL = "tiny-vit"


@pytest.fixture(scope="module")
def ray_serve_url():
    import ray
    from ray import serve

    from mixres.serve.ray_replica import deployment

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": HOST, "port": port})
    serve.run(deployment({"model": MODEL, "max_image_tokens": 256, "decode_workers": 0, "max_wait_ms": 10},
                         replicas=2, cpus_per_replica=0.5), name="mixres", route_prefix="/")
    yield f"http://{HOST}:{port}"
    serve.shutdown()
    ray.shutdown()


def test_replicas_answer_each_image_as_if_alone(ray_serve_url):
    images = [image_bytes(h, w, fmt, seed=i) for i, (h, w, fmt) in
              enumerate([(64, 64, "PNG"), (48, 160, "JPEG"), (200, 40, "WEBP"), (96, 72, "PNG")])]
    requests = [[k % 4, (k + 1) % 4] for k in range(8)]

    def call(idx):
        r = httpx.post(f"{ray_serve_url}/v1/embeddings", json={"input": [data_uri(images[i]) for i in idx]},
                       timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, requests))
    enc = mixres.load_encoder(MODEL, max_image_tokens=256)
    refs = [mixres.encode([b], model=enc).pooled[0] for b in images]
    for idx, data in zip(requests, answers):
        for i, d in zip(idx, data):
            assert rel_err(torch.tensor(d["embedding"]), refs[i]) <= 1e-5
    bad = httpx.post(f"{ray_serve_url}/v1/embeddings", json={"input": ["data:image/png;base64,AAAA"]})
    assert bad.status_code == 400 and "input[0]" in bad.json()["error"]["message"]
    assert httpx.get(f"{ray_serve_url}/ready").status_code == 200
