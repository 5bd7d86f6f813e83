"""`mixres bench serve`'s report: results.md (tables and ratios within the run) and serve.png."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_markdown", "plot"]


def _key(r: dict) -> str:
    return f"{r['clients']}x{r['images_per_request']}"


def _table(rows: dict) -> list[str]:
    lines = ["| server | clients x images/request | images/s | p50 ms | p95 ms | p99 ms | errors |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, loads in rows.items():
        for r in loads:
            lines.append(f"| {name} | {r['clients']} x {r['images_per_request']} | {r['images_per_s']:.1f} | "
                         f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |")
    return lines


def _ratios(rows: dict, base: str, against: str) -> list[str]:
    if base not in rows or against not in rows:
        return []
    other = {_key(r): r for r in rows[against]}
    out = []
    for r in rows[base]:
        o = other.get(_key(r))
        if o:
            out.append(f"- {r['clients']} clients x {r['images_per_request']}: images/s "
                       f"{r['images_per_s'] / o['images_per_s']:.2f}x {against}, p99 "
                       f"{r['p99_ms'] / o['p99_ms']:.2f}x {against}'s")
    return out


def write_markdown(res: dict, path: Path) -> None:
    env = res["env"]
    lines = ["# mixres bench serve", "", f"Command: `{res['command']}`", "",
             f"Machine: {env['processor']}, {env['cpu_count']} CPUs, torch {env['torch']}, "
             f"transformers {env['transformers']}. The load generator runs on the same CPUs as the "
             "servers, and a shared VM's speed drifts: compare rows by their ratios (measured in the "
             "same run, rounds alternating), not by absolute numbers.", ""]
    eq = res["sections"].get("equal_work")
    if eq:
        enc = eq["encoder_alone"]
        lines += ["## Equal work: 196 tokens per image (Infinity's 224 x 224 crop)", "",
                  *_table(eq["rows"]), "",
                  f"Encoder alone (`mixres.encode` on the same JPEGs, decode included, in one process): "
                  f"{enc['mean']:.1f} images/s (before the servers {enc['before']:.1f}, "
                  f"after {enc['after']:.1f}).",
                  ""]
        if eq.get("skipped"):
            lines += [f"Skipped: {eq['skipped']}", ""]
        lines += ["Ratios:", "", *_ratios(eq["rows"], "mixres packed", "infinity"),
                  *_ratios(eq["rows"], "mixres packed", "mixres batching off")]
        for r in eq["rows"].get("mixres packed", []):
            lines.append(f"- {r['clients']} clients x {r['images_per_request']}: packed server / "
                         f"encoder alone {r['images_per_s'] / enc['mean']:.2f}")
        lines.append("")
    mixed = res["sections"].get("mixed_sizes")
    if mixed:
        lines += ["## Mixed sizes: each image at its own size (64-1024 tokens), a ViT of the same shape", "",
                  *_table(mixed["rows"]), "", "Ratios:", "",
                  *_ratios(mixed["rows"], "mixres packed", "mixres padded"),
                  *_ratios(mixed["rows"], "mixres packed", "mixres batching off"), ""]
    path.write_text("\n".join(lines) + "\n")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [(k, v) for k, v in res["sections"].items()]
    fig, axes = plt.subplots(2, len(sections), figsize=(6 * len(sections), 7), squeeze=False)
    for col, (title, sec) in enumerate(sections):
        names = list(sec["rows"])
        keys = [_key(r) for r in sec["rows"][names[0]]]
        width = 0.8 / len(names)
        for row, (metric, label) in enumerate((("images_per_s", "images/s"), ("p99_ms", "p99 latency (ms)"))):
            ax = axes[row][col]
            for i, name in enumerate(names):
                vals = {_key(r): r[metric] for r in sec["rows"][name]}
                ax.bar([j + i * width for j in range(len(keys))], [vals.get(k, 0) for k in keys], width,
                       label=name)
            if metric == "images_per_s" and "encoder_alone" in sec:
                ax.axhline(sec["encoder_alone"]["mean"], color="k", ls="--", lw=1, label="encoder alone")
            ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))],
                          [f"{k.replace('x', ' clients x ')} img" for k in keys])
            ax.set_ylabel(label)
            ax.set_title(title.replace("_", " "))
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
