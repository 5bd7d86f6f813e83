"""`mixres bench gpu`: one command that checks every GPU claim, in under 8 minutes.

Sections, each timed and guarded (a failing section is recorded with its error and the
tail of its traceback, and the rest still run; a section that needs CUDA or a missing
package says "skipped: needs X"):

    environment  GPU, memory, versions, the attention backend chosen per device and dtype
    attention    every available varlen backend vs a float64 per-segment reference
    invariance   every packed family: each image in a mixed batch vs the model alone,
                 fp32 and bf16, next to the model's own bf16-vs-fp32 error
    throughput   packed vs dense oracle, padded+mask, shape-grouped, per-image loop,
                 masked; chunk-budget sweep; tokens/s and peak memory
    compile      packed under torch.compile(dynamic=True): compiles counted, same results
    embed        generated JPEGs end to end (`mixres.embed.embed`) vs the encoder alone
    vlm          train step packed vs padded for joint_decoder / cross_attention / mot
    oom          a token budget that does not fit is halved; the features are the same

Each section has a time budget and stops adding rows when it is used (and says so).
`--smoke` runs tiny sizes on the CPU (the CI form, about a minute).

    mixres bench gpu --out benchmarks/results/gpu-h100          # on a GPU machine
    mixres bench gpu --smoke --out out/gpu-smoke                  # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

from mixres.bench import gpu_checks, gpu_invariance, gpu_speed, gpu_vlm
from mixres.bench.gpu_common import Context, Skip, TimeBudget
from mixres.bench.gpu_report import plot_all, write_markdown
from mixres.bench.report import command_line, write_json


def _sections():
    # name -> (function, budget in seconds for the full run, for --smoke)
    return {
        "environment": (gpu_checks.environment, 10, 10),
        "attention": (gpu_checks.attention, 25, 15),
        "invariance": (gpu_invariance.invariance, 100, 45),
        "throughput": (gpu_speed.throughput, 110, 30),
        "compile": (gpu_speed.compile_section, 60, 60),
        "embed": (gpu_speed.embed_section, 60, 25),
        "vlm": (gpu_vlm.vlm, 40, 30),
        "oom": (gpu_checks.oom, 20, 20),
    }


SECTIONS = ("environment", "attention", "invariance", "throughput", "compile", "embed", "vlm", "oom")


def run_section(name: str, fn, ctx: Context) -> dict:
    """Run one section; never raises. status: ok | skipped (with reason) | error."""
    t0 = time.perf_counter()
    try:
        data = fn(ctx) or {}
        res = {"status": "ok", **data}
    except Skip as e:
        res = {"status": "skipped", "reason": f"skipped: {e}"}
    except Exception as e:  # recorded, and the other sections still run
        tb = traceback.format_exc().strip().splitlines()
        res = {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
               "traceback": "\n".join(tb[-12:])}
    finally:
        if ctx.cuda:
            torch.cuda.empty_cache()
    res["seconds"] = time.perf_counter() - t0
    res["budget_s"] = ctx.budget.seconds
    if ctx.notes:
        res["notes"] = list(ctx.notes)
    return res


def run_suite(out: Path, smoke: bool, device: torch.device, only: list[str] | None = None,
              total_budget: float = 480.0, overrides: dict | None = None, budget_scale: float = 1.0) -> dict:
    """Run the sections into `out` (results.json written after every section).
    budget_scale multiplies every section's budget (a slow or shared machine)."""
    table = {**_sections(), **(overrides or {})}
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": command_line(), "smoke": smoke, "device": str(device),
               "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
               "total_budget_s": total_budget, "budget_scale": budget_scale, "sections": {}}
    t0 = time.perf_counter()
    for name in SECTIONS:
        if only and name not in only:
            continue
        fn, full_s, smoke_s = table[name]
        left = total_budget - (time.perf_counter() - t0)
        if left <= 0:
            results["sections"][name] = {"status": "skipped",
                                         "reason": f"skipped: the run's total budget of {total_budget:.0f} s "
                                                   "was used"}
            continue
        own = (smoke_s if smoke else full_s) * budget_scale
        ctx = Context(smoke, device, out, TimeBudget(min(own, left)))
        print(f"[bench gpu] {name} (budget {ctx.budget.seconds:.0f} s) ...", flush=True)
        res = results["sections"][name] = run_section(name, fn, ctx)
        shown = res.get("reason") or res.get("error") or "ok"
        print(f"[bench gpu] {name}: {shown} in {res['seconds']:.1f} s", flush=True)
        results["seconds"] = time.perf_counter() - t0
        write_json(results, out / "results.json")
    results["seconds"] = time.perf_counter() - t0

    try:
        results["plots"] = plot_all(results, out)
    except Exception as e:  # plots are a convenience: the numbers are in results.json
        results["plots_error"] = f"{type(e).__name__}: {e}"
    write_json(results, out / "results.json")
    write_markdown(results, out / "results.md")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, plots)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (CI), about a minute")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--sections", nargs="*", default=None, choices=SECTIONS, help="run only these")
    p.add_argument("--total-budget", type=float, default=None,
                   help="seconds for the whole run (default 480; 240 with --smoke; times --budget-scale)")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every time budget (a slow or shared machine; CI uses 10)")


def run(args) -> int:
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    budget = (args.total_budget or (240.0 if args.smoke else 480.0)) * args.budget_scale
    res = run_suite(Path(args.out), args.smoke, device, args.sections, budget, budget_scale=args.budget_scale)
    print((Path(args.out) / "results.md").read_text())
    bad = [n for n, s in res["sections"].items() if s["status"] == "error"]
    if bad:
        print(f"[bench gpu] sections with errors: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mixres bench gpu", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
