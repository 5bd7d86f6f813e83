"""Markdown tables of the committed speed sweep and VLM runs (docs/bench.md quotes them).

    python benchmarks/speed/summary.py [benchmarks/results]
"""

import json
import sys
from pathlib import Path


def _ratio(m: dict, a: str, b: str, key: str) -> str:
    if a not in m or b not in m:
        return ""
    return f"{m[b][key] / m[a][key]:.2f}"  # time of b / time of a: how much faster a is


def speed(root: Path) -> list[str]:
    rows = ["| workload | model | tokens (images) | packed vs oracle, best / median | vs HF NaFlex | "
            "vs timm NaFlexViT | vs loop |", "|---|---|---|---|---|---|---|"]
    order = ["1-16", "16-64", "64-256", "64-1024", "words"]
    for path in sorted(root.glob("speed-cpu/*/*/results.json"),
                       key=lambda p: (order.index(p.parts[-3]) if p.parts[-3] in order else 9, str(p))):
        r = json.loads(path.read_text())
        m = r["methods"]
        # per-token rates: the oracle's token count differs from the workload's
        best = f"{m['packed']['tokens_per_s'] / m['oracle']['tokens_per_s']:.2f}" if "oracle" in m else ""
        if "oracle" in m:
            med = (r["tokens"] / m["packed"]["median_seconds"]) / (
                (m["oracle"]["tokens_per_s"] * m["oracle"]["seconds"]) / m["oracle"]["median_seconds"])
            best += f" / {med:.2f}"
        rows.append(f"| {r['workload']} | {r['model'].split('_')[0]} | {r['tokens']} ({r['n']}) | {best} | "
                    f"{_ratio(m, 'packed', 'hf-naflex', 'seconds')} | "
                    f"{_ratio(m, 'packed', 'timm-naflex', 'seconds')} | "
                    f"{_ratio(m, 'packed', 'loop', 'seconds')} |")
    return rows


def vlm(root: Path) -> list[str]:
    rows = ["| LM | strategy | LM positions packed / padded | packed vs padded, best / median |",
            "|---|---|---|---|"]
    for path in sorted(root.glob("vlm-cpu/*/results.json")):
        r = json.loads(path.read_text())
        rows.append(f"| {r['lm']} | {r['strategy']} | {r['lm_positions']} / {r['lm_positions_padded']} | "
                    f"{r['speedup']:.2f}× / {r['speedup_median']:.2f}× |")
    return rows


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    print("\n".join(speed(root)) + "\n\n" + "\n".join(vlm(root)))
