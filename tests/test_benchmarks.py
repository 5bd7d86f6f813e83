"""The benchmarks' quick paths run on tiny presets and write what a user looks at."""

import json

import pytest

from mixres.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_invariance_quick_shows_naive_padding_deviates(tmp_path):
    out = tmp_path / "inv"
    rc = main(["bench", "invariance", "--quick", "-n", "3", "--compositions", "2", "--out", str(out),
               "--families", "ViT", "ConvNeXt (CNN)", "--methods", "packed", "grouped", "naive"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert {"torch", "transformers", "command", "machine"} <= set(res)
    vit, cnn = res["cells"]["ViT"], res["cells"]["ConvNeXt (CNN)"]
    assert vit["packed"]["max_rel"] <= 1e-5 and vit["grouped"]["max_rel"] <= 1e-5
    assert cnn["grouped"]["max_rel"] <= 1e-5
    assert vit["naive"]["max_rel"] > 1e-3 and cnn["naive"]["max_rel"] > 1e-3
    assert "error" in cnn["packed"]  # packing does not apply to a CNN: shown as n/a
    assert (out / "invariance.png").stat().st_size > 10_000
    assert "| naive |" in (out / "results.md").read_text()


def test_throughput_quick_writes_table_and_plot(tmp_path):
    out = tmp_path / "tp"
    rc = main(["bench", "throughput", "--model", "tiny-vit", "-n", "4", "--repeats", "1",
               "--methods", "packed,padded,loop,oracle", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"packed", "padded", "loop", "oracle"}
    # packed, padded and loop encode the same real tokens (padding is not counted), so
    # rate x time is one number; the ratios are ratios of those rates
    m = res["methods"]
    tokens = {k: m[k]["tokens_per_s"] * m[k]["seconds"] for k in ("packed", "padded", "loop")}
    assert max(tokens.values()) == pytest.approx(min(tokens.values()), rel=1e-6)
    for name, row in m.items():
        assert row["seconds"] == min(row["times"]), name
        assert row["vs_packed"] == pytest.approx(row["tokens_per_s"] / m["packed"]["tokens_per_s"])
    assert res["methods"]["packed"]["vs_packed"] == pytest.approx(1.0)
    assert (out / "throughput.png").stat().st_size > 10_000
    assert "| packed |" in (out / "results.md").read_text()


def test_words_quick(tmp_path):
    out = tmp_path / "words"
    rc = main(["bench", "words", "--models", "tiny-vit", "-b", "2", "-l", "4", "--repeats", "1",
               "--methods", "sequential", "auto", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    (row,) = res["rows"]
    assert row["route"] == "packed" and row["images"] == 8
    auto, seq = row["methods"]["auto"], row["methods"]["sequential"]
    # the packed route gives what one-at-a-time gives, and the ratio is the one of the timings
    assert auto["max_abs_err"] <= 1e-4 and seq["max_abs_err"] == 0
    assert auto["speedup_vs_sequential"] == pytest.approx(seq["seconds"] / auto["seconds"])
    assert "| tiny-vit |" in (out / "results.md").read_text()


def test_throughput_token_ranges_words_and_hf_naflex(tmp_path, capsys):
    out = tmp_path / "tp"
    rc = main(["bench", "throughput", "--model", "tiny-siglip2", "--tokens", "1-16", "-n", "12",
               "--repeats", "1", "--methods", "packed,hf-naflex,oracle", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    lo, hi = res["image_tokens"]
    assert 1 <= lo <= hi <= 16 and res["workload"] == "mixed-12 (1-16 tokens)"
    assert set(res["methods"]) == {"packed", "hf-naflex", "oracle"}
    assert res["oracle_side"] < 224  # uniform images of the workload's mean size
    rc = main(["bench", "throughput", "--model", "tiny-vit", "--workload", "words", "-n", "10",
               "--repeats", "1", "--methods", "packed,oracle", "--out", str(tmp_path / "w")])
    res = json.loads((tmp_path / "w" / "results.json").read_text())
    assert rc == 0 and res["workload"] == "words-10"
    assert 1 <= res["image_tokens"][0] <= res["image_tokens"][1] <= 64
    rc = main(["bench", "throughput", "--model", "tiny-vit", "--tokens", "16-1", "--out", str(tmp_path)])
    assert rc != 0 and "--tokens '16-1': expected LO-HI" in capsys.readouterr().err


def test_invariance_bf16_reports_the_models_own_error_and_the_ratio(tmp_path):
    out = tmp_path / "inv"
    rc = main(["bench", "invariance", "--quick", "--dtype", "bfloat16", "-n", "3", "--compositions", "1",
               "--out", str(out), "--families", "ViT", "--methods", "packed", "naive"])
    assert rc == 0
    cell = json.loads((out / "results.json").read_text())["cells"]["ViT"]
    own = cell["packed"]["own_max_rel"]
    assert 1e-4 < own < 5e-2  # bf16 rounding, the model's own
    assert cell["packed"]["ratio_max"] <= 1.5  # packing adds at most half of it
    assert cell["naive"]["ratio_max"] > 10
    assert "own error" in (out / "results.md").read_text()


def test_search_quick_states_recall_of_the_approximate_indexes(tmp_path):
    out = tmp_path / "search"
    rc = main(["bench", "search", "--sizes", "3000", "--dim", "32", "--queries", "40", "--ivf-nprobe", "1",
               "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    rows = {(r["kind"], r.get("nprobe")): r for r in res["rows"]}
    assert rows[("flat", None)]["auto"] and rows[("flat", None)]["recall@10"] == 1.0  # flat is the reference
    ivf, ivf1 = rows[("ivf", 16)], rows[("ivf", 1)]
    assert 0.9 <= ivf["recall@10"] <= 1.0 and ivf1["recall@10"] < ivf["recall@10"]  # fewer cells, less found
    assert rows[("hnsw", None)]["recall@10"] >= 0.9
    assert f"| 3,000 | ivf (nlist {ivf['nlist']}, nprobe 16) | " in (out / "results.md").read_text()
