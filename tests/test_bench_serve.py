"""`mixres bench serve`'s quick path: real servers on 127.0.0.1, every row served without errors,
the report and the plot written (Infinity's row skipped and said so where its venv is absent)."""

import json

from mixres.cli import main


def test_bench_serve_quick(tmp_path):
    out = tmp_path / "serve"
    rc = main(["bench", "serve", "--hidden", "64", "--layers", "1", "--images", "4", "--settings", "2x1",
               "--mixed-settings", "2x2", "--rounds", "1", "--time-limit", "60",
               "--infinity-venv", str(tmp_path / "no-venv"), "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    eq, mixed = res["sections"]["equal_work"], res["sections"]["mixed_sizes"]
    assert set(eq["rows"]) == {"mixres packed", "mixres batching off"} and "infinity" in eq["skipped"]
    assert set(mixed["rows"]) == {"mixres packed", "mixres padded", "mixres batching off"}
    for sec in (eq, mixed):
        for loads in sec["rows"].values():
            assert all(r["errors"] == 0 and r["images"] >= 4 and r["images_per_s"] > 0 for r in loads)
    assert eq["encoder_alone"]["mean"] > 0
    assert "| mixres padded | 2 x 2 |" in (out / "results.md").read_text()
    assert (out / "serve.png").stat().st_size > 10_000
