"""A closed-loop load generator for HTTP embedding servers on 127.0.0.1.

N clients each send a request, wait for its answer and send the next, until `requests`
requests are done or `time_limit_s` has passed (both bounded). Bodies are encoded to bytes
beforehand, so the generator's own work per request is one POST.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

__all__ = ["closed_loop", "percentile", "summarize"]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between ranks; nan for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


async def _run(url: str, bodies: list[tuple[bytes, int]], clients: int, requests: int,
               time_limit_s: float, path: str) -> dict:
    if not url.startswith(("http://127.", "http://localhost")):
        raise ValueError(f"the load generator only talks to this machine (127.0.0.0/8), got {url}")
    latencies, images, errors, first_error = [], 0, 0, None
    counter = iter(range(requests))
    headers = {"Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        r = await c.post(path, content=bodies[0][0], headers=headers)  # warm-up, not counted
        if r.status_code != 200:
            raise RuntimeError(f"{url}{path}: warm-up answered {r.status_code}: {r.text[:300]}")
        start = time.perf_counter()

        async def client():
            nonlocal images, errors, first_error
            for i in counter:
                if time.perf_counter() - start > time_limit_s:
                    return
                body, n = bodies[i % len(bodies)]
                t = time.perf_counter()
                r = await c.post(path, content=body, headers=headers)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t)
                    images += n
                else:
                    errors += 1
                    first_error = first_error or f"{r.status_code}: {r.text[:200]}"

        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.perf_counter() - start
    return {"clients": clients, "images": images, "errors": errors, "first_error": first_error,
            "seconds": seconds, "latencies": latencies}


def summarize(parts: list[dict]) -> dict:
    """One load's rounds -> images/s over their summed time and percentiles over all latencies."""
    lat = [x for p in parts for x in p["latencies"]]
    images, seconds = sum(p["images"] for p in parts), sum(p["seconds"] for p in parts)
    errors = [p["first_error"] for p in parts if p["first_error"]]
    return {"clients": parts[0]["clients"], "rounds": len(parts), "requests": len(lat), "images": images,
            "errors": sum(p["errors"] for p in parts), "first_error": errors[0] if errors else None,
            "seconds": seconds, "images_per_s": images / seconds, "p50_ms": 1000 * percentile(lat, 50),
            "p95_ms": 1000 * percentile(lat, 95), "p99_ms": 1000 * percentile(lat, 99)}


def closed_loop(url: str, groups: list[list[str]], make_body, *, clients: int, requests: int,
                time_limit_s: float = 120.0, path: str = "/v1/embeddings") -> dict:
    """Run the load; `groups` are the requests' image lists (data URIs), `make_body(uris) -> dict`.
    Returns the raw load (its latencies) for `summarize`."""
    bodies = [(json.dumps(make_body(g)).encode(), len(g)) for g in groups]
    return asyncio.run(_run(url, bodies, clients, requests, time_limit_s, path))
