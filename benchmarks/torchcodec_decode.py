"""TorchCodec's CPU JPEG decode in the `fast` route, timed against simplejpeg (issue 24).

The `mixres bench embed` decode harness (`mixres.bench.embed.time_decoders`: one torch
thread, each image's fastest of the rounds) on the mixed-JPEG set at several token budgets
and on 2400-4000 px JPEGs, with the same plan, resize and normalize after the decode; then
each route's mean |d| from pil in [0, 1] pixels. Prints one JSON line per measurement.

    python benchmarks/torchcodec_decode.py --n 32 --tokens 256,1024,4096 --rounds 3
"""

import argparse
import json
import tempfile

import torch
from torchcodec.decoders import decode_jpeg

from mixres import decode as D
from mixres.bench.embed import time_decoders
from mixres.workloads import write_mixed_jpegs


@D.DECODERS.register("torchcodec-cpu")
class TorchCodecCPU(D.FastDecoder):
    """fast's plan, with the JPEG decoded by TorchCodec (which has no reduced DCT scale)."""

    def _resized(self, src, patch_size, min_image_tokens=1, max_image_tokens=None, background=D._WHITE,
                 max_pixels=D.DEFAULT_MAX_PIXELS):
        plan = D._plan(src, patch_size, min_image_tokens, max_image_tokens, background, max_pixels)
        if plan.route == "pil":
            x = D._hwc_to_nchw(plan.img)
        else:
            x = decode_jpeg(torch.frombuffer(bytearray(plan.data), dtype=torch.uint8), mode="RGB")[None]
        return D._resize_u8(x, plan.target)


def spec(tokens: int) -> dict:
    return {"kw": {"patch_size": 16, "min_image_tokens": 1, "max_image_tokens": tokens,
                   "mean": (0.5,) * 3, "std": (0.5,) * 3}, "batch": 8}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--tokens", default="256,1024,4096")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    names = ["pil", "fast", "torchcodec-cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        mixed = [f.read_bytes() for f in write_mixed_jpegs(f"{tmp}/mixed", n=args.n, seed=0)]
        large = [f.read_bytes() for f in write_mixed_jpegs(f"{tmp}/large", n=6, seed=1, sides=(2400, 4000))]
        for name, blobs, tokens in [("mixed 200-1000 px", mixed, int(t)) for t in args.tokens.split(",")] + [
                ("large 2400-4000 px", large, 256)]:
            r = time_decoders(names, blobs, spec(tokens), args.rounds)
            print(json.dumps({"set": name, "max_image_tokens": tokens, "images_per_s_per_core":
                              {k: round(v, 1) for k, v in r.items()},
                              "torchcodec / simplejpeg": round(r["torchcodec-cpu"] / r["fast"], 2)}))
        kw = {"patch_size": 16, "max_image_tokens": 256}
        pil = D.get_decoder("pil")
        for n in names[1:]:
            dec = D.get_decoder(n)
            d = [255 * float((pil.pixels(b, **kw) - dec.pixels(b, **kw)).abs().mean()) for b in mixed]
            print(json.dumps({"route": n, "mean |d| from pil /255 (mixed, 256 tokens)":
                              round(sum(d) / len(d), 3), "worst image": round(max(d), 3)}))


if __name__ == "__main__":
    main()
