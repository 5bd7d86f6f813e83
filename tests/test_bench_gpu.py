"""`mixres bench gpu`: its CPU smoke form runs every section, and what it claims holds.

The smoke run is the one a user types (`python -m mixres bench gpu --smoke --out DIR`, in
a child process); the other tests read its results.json or call its parts directly.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixres.bench.gpu import SECTIONS, run_section, run_suite
from mixres.bench.gpu_common import Context, Skip, TimeBudget

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-smoke")
    # budgets x10: on a shared CI machine a section must not stop early (the guard has its own test)
    r = subprocess.run([sys.executable, "-m", "mixres", "bench", "gpu", "--smoke", "--budget-scale", "10",
                        "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_smoke_run_has_every_section_ok_or_skipped_with_a_reason(smoke):
    out, res = smoke
    assert list(res["sections"]) == list(SECTIONS)
    for name, sec in res["sections"].items():
        assert sec["status"] in ("ok", "skipped"), (name, sec.get("error"), sec.get("traceback"))
        if sec["status"] == "skipped":
            assert sec["reason"].startswith("skipped: needs"), (name, sec["reason"])
    # on the CPU every section runs; only its CUDA-only rows say why they did not
    assert all(sec["status"] == "ok" for sec in res["sections"].values())
    s = res["sections"]
    assert s["attention"]["speed"]["reason"] == "skipped: needs CUDA (the flash backend)"
    assert s["environment"]["attention_backend"]["cuda bfloat16"] == "skipped: needs CUDA"
    decoders = s["embed"]["decoders"]
    assert decoders["cuda"]["reason"] == "skipped: needs CUDA"
    assert all(decoders[d]["embed_images_per_s"] > 0 for d in ("pil", "fast"))
    assert res["command"].startswith("mixres bench gpu --smoke")
    assert not any("notes" in sec for sec in s.values())  # nothing left out
    md = (out / "results.md").read_text()
    for name in SECTIONS:
        assert f"## {name} (ok" in md
    assert (out / "throughput.png").stat().st_size > 5_000 and (out / "invariance.png").is_file()


def test_smoke_numbers_say_what_the_suite_promises(smoke):
    s = smoke[1]["sections"]
    inv = s["invariance"]
    ran = [f for f, r in inv["families"].items() if r["status"] == "ok"]
    assert {"ViT", "DeiT", "CLIP", "SigLIP", "SigLIP2", "DINOv2", "DINOv2-reg", "DINOv3 ViT"} <= set(ran)
    for fam in ran:  # fp32: the contract; bf16: not worse than 1.5x the model's own bf16 error
        r = inv["families"][fam]
        assert r["fp32_max_rel"] <= 1e-5 and r["bf16_ratio_max"] <= 1.5 and r["passed"], fam
    tp = s["throughput"]["models"][0]
    assert {"packed", "oracle", "padded", "grouped", "loop", "masked"} <= set(tp["methods"])
    assert all(r["tokens_per_s"] > 0 and r["peak_mib"] is None for r in tp["methods"].values())
    assert tp["chunk_sweep"] and s["throughput"]["peak_memory"].startswith("None")
    assert s["embed"]["images"] == s["embed"]["files"] == 16 and s["embed"]["errors"] == 0
    assert [r["strategy"] for r in s["vlm"]["strategies"]] == ["joint_decoder", "cross_attention", "mot"]
    for r in s["vlm"]["strategies"]:  # the padded baseline computes the same loss
        assert abs(r["loss_packed"] - r["loss_padded"]) <= 1e-4 * abs(r["loss_packed"]), r["strategy"]


def test_attention_dispatch_and_accuracy_on_cpu(smoke):
    from mixres.attention import available_backends, use_backend, varlen_attention

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert available_backends(torch.zeros(2, 1, 64, dtype=dtype)) == ["sdpa"]  # flash is CUDA-only
    q = torch.randn(4, 2, 64)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with use_backend("flash"), pytest.raises(ValueError, match="cannot run on cpu torch.float32"):
        varlen_attention(q, q, q, cu, cu, 4, 4)
    att = smoke[1]["sections"]["attention"]
    cases = {r["case"] for r in att["rows"]}
    assert {"self causal GQA 8/2", "cross q!=k", "decode 1 query causal"} <= cases
    assert att["max_rel_error"]["sdpa float32"] <= 1e-5
    assert att["max_rel_error"]["sdpa bfloat16"] <= 2e-2


@pytest.mark.parametrize("signature", ["is_causal", "window_size", "window_size+enable_gqa"])
def test_flash_call_matches_each_torch_varlen_signature(signature, monkeypatch):
    """The flash backend's call adapts to torch's varlen_attn of 2.10 (is_causal, no scale),
    2.11-2.13 (keyword scale / window_size) and 2.14 (+ enable_gqa): a stand-in with that
    signature computes the float64 reference from exactly the arguments it is given."""
    import torch.nn.attention.varlen as varlen

    import mixres.attention as A
    from mixres.bench.gpu_checks import _tensors, attention_cases, reference_attention

    def check(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, gqa):
        assert cu_q.dtype == cu_k.dtype == torch.int32 and isinstance(max_q, int)
        if not gqa:
            assert q.shape[1] == k.shape[1], "kv heads must be repeated without enable_gqa"
        return reference_attention(q, k, v, cu_q, cu_k, causal, scale).float()

    fakes = {
        "is_causal": lambda q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None:
            check(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, None, False),
        "window_size": lambda q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1): check(q, k, v, cu_q, cu_k, max_q, max_k, window_size == (-1, 0), scale,
                                        False),
        "window_size+enable_gqa": lambda q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), enable_gqa=False: check(q, k, v, cu_q, cu_k, max_q, max_k,
                                                          window_size == (-1, 0), scale, enable_gqa),
    }
    monkeypatch.setattr(varlen, "varlen_attn", fakes[signature])
    monkeypatch.setattr(A, "_VARLEN_PARAMS", None)
    flash = A.ATTENTION_BACKENDS.get("flash")
    for case in attention_cases(smoke=True):
        (q, k, v), cu_q, cu_k = _tensors(case, 64, "cpu", torch.float32)
        for scale in (None, 0.05):
            out = flash(q, k, v, cu_q, cu_k, max(case["lq"]), max(case["lk"]), case["causal"], scale)
            ref = reference_attention(q, k, v, cu_q, cu_k, case["causal"], scale)
            assert (out.double() - ref).abs().max() / ref.abs().max() <= 1e-5, (case["name"], scale)


def test_a_failing_section_is_recorded_and_the_rest_still_run(tmp_path):
    def boom(ctx):
        raise RuntimeError("injected failure")

    def needs_gpu(ctx):
        raise Skip("needs CUDA")

    def fine(ctx):
        return {"value": 1}

    overrides = {name: (fine, 5, 5) for name in SECTIONS}
    overrides["attention"] = (boom, 5, 5)
    overrides["vlm"] = (needs_gpu, 5, 5)
    res = run_suite(tmp_path, smoke=True, device=torch.device("cpu"), overrides=overrides)
    s = res["sections"]
    assert s["attention"]["status"] == "error" and s["attention"]["error"] == "RuntimeError: injected failure"
    assert "in boom" in s["attention"]["traceback"]
    assert s["vlm"] == {**s["vlm"], "status": "skipped", "reason": "skipped: needs CUDA"}
    ok = [n for n, r in s.items() if r["status"] == "ok"]
    assert ok == [n for n in SECTIONS if n not in ("attention", "vlm")]
    assert json.loads((tmp_path / "results.json").read_text())["sections"]["oom"]["value"] == 1
    assert "injected failure" in (tmp_path / "results.md").read_text()


def test_section_budget_stops_adding_rows_and_says_so():
    def rows(ctx):
        done = []
        for i in range(5):
            if ctx.stop("rows", 5 - i):
                break
            done.append(i)
            ctx.budget.seconds = 0  # the budget is used after the first row
        return {"rows": done}

    ctx = Context(True, torch.device("cpu"), Path("."), TimeBudget(60))
    res = run_section("x", rows, ctx)
    assert res["rows"] == [0] and "4 rows left out" in res["notes"][0]


def test_compile_path_on_cpu_dynamic_shapes_compiles_once_same_results(smoke):
    from mixres.bench.gpu_speed import compile_check
    from mixres.presets import build
    from mixres.workloads import mixed_images

    c = smoke[1]["sections"]["compile"]
    assert c["dynamic"] and c["frames_compiled"] > 0 and c["passed"] and c["max_rel_vs_eager"] <= 1e-5
    # three batches of different sizes: everything is compiled on the first one, no recompiles
    counts = [b["frames_compiled_so_far"] for b in c["batches"]]
    assert len({b["tokens"] for b in c["batches"]}) == 3 and counts[0] == counts[-1] == c["frames_compiled"]
    # and directly, with another model and other shapes
    images = mixed_images(5, seed=3, patch_size=16, min_image_tokens=8, max_image_tokens=40)
    r = compile_check(build("tiny-siglip"), [images[:3], images[3:]], torch.device("cpu"), torch.float32,
                      "aot_eager")
    assert r["max_rel_vs_eager"] <= 1e-5 and r["batches"][0]["frames_compiled_so_far"] == r["frames_compiled"]


def test_oom_halving_with_a_simulated_oom_gives_the_unconstrained_features(smoke, tmp_path):
    from mixres.bench.gpu_checks import run_oom
    from mixres.presets import build
    from mixres.workloads import write_photos

    o = smoke[1]["sections"]["oom"]
    assert o["passed"] and o["ooms_raised"] > 0 and o["max_rel_diff"] <= 1e-5 and o["simulated"]
    photos = write_photos(tmp_path / "photos", n=6, seed=1)
    model = build("tiny-clip")
    r = run_oom(copy.deepcopy(model), photos, tmp_path, limit=70, budget=4096, device="cpu",
                dtype=torch.float32)
    assert r["ooms_raised"] >= 2 and r["largest_forward_after"] <= 70  # halved more than once
    assert r["images"] == r["images_unconstrained"] == 6 and r["errors"] == 0 and r["same_paths"]
    assert r["max_rel_diff"] <= 1e-5
