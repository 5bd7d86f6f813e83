"""results.md and the plots of `mixres bench gpu` (everything also lies in results.json)."""

from __future__ import annotations

from pathlib import Path


def _f(x, spec=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _status(name: str, sec: dict) -> list[str]:
    head = f"## {name} ({sec['status']}, {sec['seconds']:.1f} s of a {sec['budget_s']:.0f} s budget)"
    lines = [head, ""]
    if sec["status"] == "skipped":
        lines += [sec["reason"], ""]
    elif sec["status"] == "error":
        lines += [f"error: `{sec['error']}`", "", "```", sec["traceback"], "```", ""]
    for note in sec.get("notes", []):
        lines += [f"note: {note}", ""]
    return lines


def _environment(s):
    keys = ("gpu", "gpu_memory_gib", "cuda", "torch", "transformers", "python", "platform")
    lines = [f"- {k}: {s[k]}" for k in keys if k in s]
    lines += [f"- attention backend, {k}: {v}" for k, v in s["attention_backend"].items()]
    lines += ["- packages: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in s["packages"].items()), ""]
    return lines


def _attention(s):
    lines = ["| backend dtype | max relative error vs float64 |", "|---|---|"]
    lines += [f"| {k} | {v:.2e} |" for k, v in s["max_rel_error"].items()]
    sp = s["speed"]
    lines.append("")
    if sp.get("status") == "skipped":
        lines.append(f"flash vs SDPA speed: {sp['reason']}")
    else:
        lines.append(f"speed on {sp['tokens']} tokens in {sp['segments']} segments: "
                     + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in sp["seconds"].items())
                     + f"; flash / SDPA speed-up {_f(sp['flash_speedup_vs_sdpa'])}")
    return lines + [""]


def _invariance(s):
    lines = [f"bar: fp32 <= {s['fp32_tol']:g}; packed bf16 error <= {s['bf16_bar']} x the model's own "
             "bf16-vs-fp32 error on every image", "",
             "| family | fp32 packed vs alone | bf16 packed vs fp32 alone | own bf16 vs fp32 | worst ratio "
             "| pass |",
             "|---|---|---|---|---|---|"]
    for fam, r in s["families"].items():
        if r["status"] != "ok":
            lines.append(f"| {fam} | {r.get('reason') or r.get('error')} | | | | |")
            continue
        lines.append(f"| {fam} | {r['fp32_max_rel']:.1e} | {r['bf16_max_rel']:.1e} "
                     f"| {r['own_bf16_max_rel']:.1e} | {r['bf16_ratio_max']:.2f} "
                     f"| {'pass' if r['passed'] else 'FAIL'} |")
    return lines + [""]


def _throughput(s):
    lines = [f"peak memory: {s['peak_memory']}", ""]
    for m in s["models"]:
        lines += [f"### {m['model']} {m['dtype']}, {m['images']} images, {m['tokens']} tokens "
                  f"({m['distinct_shapes']} shapes)", "",
                  "| method | seconds | tokens/s | peak MiB | packed is x faster |", "|---|---|---|---|---|"]
        for name, r in m["methods"].items():
            ratio = m["ratios"].get(f"packed_vs_{name}")
            lines.append(f"| {name} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} "
                         f"| {_f(r['peak_mib'], '.0f')} | {_f(ratio, '.2f')} |")
        for name, why in m["skipped_methods"].items():
            lines.append(f"| {name} | {why} | | | |")
        lines += ["", "chunk-budget sweep (packed): "
                  + ", ".join(f"{_f(r['max_batch_tokens'])}: {r['tokens_per_s']:.0f} tok/s"
                              + (f" / {r['peak_mib']:.0f} MiB" if r["peak_mib"] else "")
                              for r in m["chunk_sweep"]), ""]
    return lines


def _compile(s):
    return [f"{s['model']} {s['dtype']}, backend {s['backend']}, dynamic=True: {s['frames_compiled']} frames "
            f"compiled over {len(s['batches'])} batches of different shapes "
            f"({s['frames_compiled_after_timing']} after the timing runs); max relative difference vs eager "
            f"{s['max_rel_vs_eager']:.1e}; " + _compile_bar(s) + "; "
            f"eager {s['eager_seconds']:.3f} s, compiled {s['compiled_seconds']:.3f} s "
            f"(x{s['compiled_speedup']:.2f})", ""]


def _compile_bar(s):
    verdict = "pass" if s["passed"] else "FAIL"
    if "tol" in s:
        return f"tol {s['tol']:g}: {verdict}"
    return (f"vs fp32, compiled's error is at most {s['worst_ratio_vs_eager_own_error']:.2f} x eager's own "
            f"(bar {s['tol_ratio']:g} x): {verdict}")


def _embed(s):
    return [f"{s['files']} generated photos, {s['model']} {s['dtype']}, {s['num_workers']} decode workers: "
            f"`mixres.embed.embed` {s['embed_images_per_s']:.1f} images/s end to end; the encoder alone on "
            f"pre-decoded tensors {s['encoder_images_per_s']:.1f} images/s "
            f"(ratio {s['embed_vs_encoder']:.2f})",
            "", "| decoder | embed images/s | vs encoder alone |", "|---|---|---|",
            *(f"| {name} | {row['embed_images_per_s']:.1f} | {row['embed_vs_encoder']:.2f} |"
              if "embed_images_per_s" in row else f"| {name} | {row['reason']} | |"
              for name, row in s["decoders"].items()), ""]


def _vlm(s):
    lines = [f"{s['dtype']}, encoder {s['encoder']}", "",
             "| strategy | packed tok/s | padded tok/s | speed-up | peak packed / padded MiB |",
             "|---|---|---|---|---|"]
    for r in s["strategies"]:
        pk, pd = r["methods"]["packed"], r["methods"]["padded"]
        lines.append(f"| {r['strategy']} | {pk['tokens_per_s']:.0f} | {pd['tokens_per_s']:.0f} | "
                     f"{r['packed_speedup']:.2f} | {_f(pk['peak_mib'], '.0f')} / "
                     f"{_f(pd['peak_mib'], '.0f')} |")
    return lines + [""]


def _oom(s):
    return [f"{s['how']}; budget {s['max_batch_tokens']} tokens: {s['ooms_raised']} OOMs, halved down to "
            f"forwards of <= {s['largest_forward_after']} tokens; {s['images']} images, same paths "
            f"{_f(s['same_paths'])}, max relative difference {s['max_rel_diff']:.1e} -> "
            f"{'pass' if s['passed'] else 'FAIL'}", ""]


RENDER = {"environment": _environment, "attention": _attention, "invariance": _invariance,
          "throughput": _throughput, "compile": _compile, "embed": _embed, "vlm": _vlm, "oom": _oom}


def write_markdown(res: dict, path: Path) -> None:
    lines = [f"# mixres bench gpu ({'smoke, ' if res['smoke'] else ''}{res['device']})", "",
             f"command: `{res['command']}`; started {res['started_utc']} UTC; "
             f"{res.get('seconds', 0):.0f} s of a {res['total_budget_s']:.0f} s budget", ""]
    lines += ["| section | status | seconds |", "|---|---|---|"]
    for name, sec in res["sections"].items():
        lines.append(f"| {name} | {sec.get('reason') or sec.get('error') or sec['status']} | "
                     f"{sec.get('seconds', 0):.1f} |")
    lines.append("")
    for name, sec in res["sections"].items():
        lines += _status(name, sec)
        if sec["status"] == "ok":
            try:
                lines += RENDER[name](sec)
            except (KeyError, TypeError, ValueError) as e:  # a partial section: the numbers are in the JSON
                lines += [f"(not rendered: {type(e).__name__}: {e}; see results.json)", ""]
    for p in res.get("plots", []):
        lines.append(f"![{p}]({p})")
    path.write_text("\n".join(lines) + "\n")


def plot_all(res: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    tp = res["sections"].get("throughput", {})
    models = tp.get("models", []) if tp.get("status") == "ok" else []
    if models:
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.5), squeeze=False)
        for ax, m in zip(axes[0], models):
            names = list(m["methods"])
            ax.bar(names, [m["methods"][n]["tokens_per_s"] for n in names],
                   color=["tab:green" if n == "packed" else "tab:red" if n == "oracle" else "tab:gray"
                          for n in names])
            ax.set_title(f"{m['model']} {m['dtype']}, mixed-{m['images']}")
            ax.set_ylabel("tokens / s")
            ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)
        made.append("throughput.png")
    inv = res["sections"].get("invariance", {})
    fams = {f: r for f, r in inv.get("families", {}).items() if r.get("status") == "ok"}
    if fams:
        import numpy as np
        x = np.arange(len(fams))
        fig, ax = plt.subplots(figsize=(1.1 * len(fams) + 3, 3.5))
        for i, (key, label) in enumerate((("fp32_max_rel", "fp32 packed"), ("bf16_max_rel", "bf16 packed"),
                                          ("own_bf16_max_rel", "model's own bf16"))):
            ax.bar(x + (i - 1) * 0.27, [max(r[key], 1e-12) for r in fams.values()], 0.27, label=label)
        ax.set_yscale("log")
        ax.set_xticks(x, list(fams), rotation=30, ha="right")
        ax.set_ylabel("max relative error vs fp32 alone")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "invariance.png", dpi=110)
        plt.close(fig)
        made.append("invariance.png")
    vl = res["sections"].get("vlm", {})
    if vl.get("status") == "ok" and vl.get("strategies"):
        rows = vl["strategies"]
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        import numpy as np
        x = np.arange(len(rows))
        for i, m in enumerate(("packed", "padded")):
            ax.bar(x + (i - 0.5) * 0.4, [r["methods"][m]["tokens_per_s"] for r in rows], 0.4, label=m)
        ax.set_xticks(x, [r["strategy"] for r in rows])
        ax.set_ylabel("train-step tokens / s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "vlm.png", dpi=110)
        plt.close(fig)
        made.append("vlm.png")
    return made
