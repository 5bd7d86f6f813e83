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
    assert all(m["tokens_per_s"] > 0 for m in res["methods"].values())
    assert res["methods"]["packed"]["vs_packed"] == pytest.approx(1.0)
    assert (out / "throughput.png").stat().st_size > 10_000
    assert "| packed |" in (out / "results.md").read_text()


def test_words_quick(tmp_path):
    out = tmp_path / "words"
    rc = main(["bench", "words", "--models", "tiny-vit", "-b", "2", "-l", "4", "--repeats", "1",
               "--methods", "sequential", "auto", "--out", str(out)])
    assert rc == 0
    assert (out / "results.json").exists() and (out / "results.md").exists()
