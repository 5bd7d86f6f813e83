"""The engine's queue: whole requests in one forward where they fit, no request starved."""

import torch

from mixres.serve.queue import Item, TokenQueue


def _put(q, request, sizes):
    q.put(request, [Item(torch.zeros(1), n, request, i) for i, n in enumerate(sizes)])


def _batches(q, budget):
    out = []
    while b := q.take(budget, 0, 0.01):
        out.append([(it.request, it.index) for it in b])
    return out


def test_requests_that_fit_are_answered_by_one_forward_and_a_large_one_starves_nobody():
    q = TokenQueue(10**6)
    _put(q, 1, [100] * 24)  # larger than the budget: several forwards
    _put(q, 2, [100] * 4)
    _put(q, 3, [50])
    batches = _batches(q, 1000)
    assert batches[0] == [(1, i) for i in range(10)]
    # the large request moved behind: the next forward answers 2 and 3 whole, then fills up
    assert batches[1][:5] == [(2, 0), (2, 1), (2, 2), (2, 3), (3, 0)]
    taken = [x for b in batches for x in b]
    assert sorted(taken) == sorted([(1, i) for i in range(24)] + [(2, i) for i in range(4)] + [(3, 0)])
    assert q.tokens == 0 and q.images == 0


def test_an_image_that_does_not_fit_lets_smaller_ones_of_later_requests_go():
    q = TokenQueue(10**6)
    _put(q, 1, [60, 60])
    _put(q, 2, [30])
    assert _batches(q, 100) == [[(1, 0), (2, 0)], [(1, 1)]]


def test_a_request_that_fits_one_forward_is_never_split():
    """Three requests of 400 tokens, budget 1000: the third waits whole for the next forward
    (split, its answer would wait for both), which it starts even when later requests came."""
    q = TokenQueue(10**6)
    for r in (1, 2, 3):
        _put(q, r, [100] * 4)
    first = q.take(1000, 0, 0.01)
    assert [(it.request, it.index) for it in first] == [(r, i) for r in (1, 2) for i in range(4)]
    _put(q, 4, [100] * 4)
    _put(q, 5, [100] * 4)
    second = [(it.request, it.index) for it in q.take(1000, 0, 0.01)]
    assert second == [(r, i) for r in (3, 4) for i in range(4)]


def test_a_request_cut_by_the_budget_finishes_first_in_the_next():
    q = TokenQueue(10**6)
    _put(q, 1, [100] * 14)  # larger than one forward: cut
    first = q.take(1000, 0, 0.01)
    assert len(first) == 10
    _put(q, 2, [100] * 2)
    second = [(it.request, it.index) for it in q.take(1000, 0, 0.01)]
    assert second[:4] == [(1, 10), (1, 11), (1, 12), (1, 13)]


def test_a_batch_below_the_budget_waits_for_images_still_being_decoded():
    """Images being decoded (`arriving`) join the batch when they land within ARRIVING_WAIT_S;
    the batch does not wait longer than that for them."""
    import threading
    import time

    from mixres.serve.queue import ARRIVING_WAIT_S

    q = TokenQueue(10**6)
    _put(q, 1, [100])
    q.arriving(1)

    def land():
        time.sleep(ARRIVING_WAIT_S / 4)
        _put(q, 2, [100])
        q.arriving(-1)

    t = threading.Thread(target=land)
    t.start()
    batch = q.take(1000, 0.0, 0.01)
    t.join()
    assert [(it.request, it.index) for it in batch] == [(1, 0), (2, 0)]
    _put(q, 3, [100])
    q.arriving(1)  # never lands
    t0 = time.monotonic()
    assert [(it.request, it.index) for it in q.take(1000, 0.0, 0.01)] == [(3, 0)]
    assert time.monotonic() - t0 < ARRIVING_WAIT_S + 0.5


def test_on_the_cpu_a_step_is_the_encoders_cache_sized_forward():
    """--max-batch-tokens above the CPU forward (2048) takes no more than that per step (a
    bigger forward costs more per token there); an image of --max-image-tokens still fits."""
    from mixres.serve import Engine

    big = Engine("tiny-vit", max_batch_tokens=8192, max_image_tokens=1024)
    chunk = big.encoder.chunk_budget(torch.device("cpu"))
    assert chunk == 2048 and big.max_batch_tokens == 2048
    assert Engine("tiny-vit", max_batch_tokens=512, max_image_tokens=256).max_batch_tokens == 512
    assert Engine("tiny-vit", max_batch_tokens=8192, max_image_tokens=4096).max_batch_tokens == 4096


def test_images_stop_arriving_when_their_request_is_admitted_or_unreadable():
    """The engine counts a request's images as arriving only while they decode: an
    admitted request and one with an unreadable image (400) both leave the count at zero,
    so no batch waits for images that will never come."""
    import asyncio
    import io

    import pytest
    from PIL import Image

    from mixres.serve import Engine
    from mixres.serve.engine import InputError

    buf = io.BytesIO()
    Image.new("RGB", (40, 24), (200, 10, 10)).save(buf, format="PNG")
    engine = Engine("tiny-vit").start()
    try:
        async def go():
            ok = await engine.embed([buf.getvalue(), buf.getvalue()])
            assert len(ok) == 2
            with pytest.raises(InputError) as bad:
                await engine.embed([buf.getvalue(), b"not an image"])
            assert bad.value.index == 1
        asyncio.run(go())
        assert engine.queue._arriving == 0 and engine.queue.images == 0
    finally:
        engine.close()
