"""`EmbedConfig` is the one definition of embed's settings: the command line is made from it,
docs/embed.md names every flag it has (and no other), the commands the docs show parse, and a
TOML file holds the same names."""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import fields
from pathlib import Path

import pytest

from mixres.embed import EmbedConfig
from mixres.embed.cli import add_arguments
from mixres.embed.config import config_from_args

DOCS = Path(__file__).resolve().parents[1] / "docs" / "embed.md"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixres embed", exit_on_error=False)
    add_arguments(p)
    return p


def flags_of(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings
            if s.startswith("--") and a.help != argparse.SUPPRESS and s != "--help"}


def test_docs_name_every_flag_and_no_other():
    text = DOCS.read_text()
    table = set(re.findall(r"^\| `(--[a-z-]+)", text, re.M))
    assert table == flags_of(parser())
    for f in fields(EmbedConfig):  # every setting has a flag, or is the library's own
        assert f.metadata["cli"] is False or f.metadata["flag"] or f"--{f.name.replace('_', '-')}" in table


def test_every_command_in_the_docs_parses():
    commands = re.findall(r"^(?:torchrun .* -m )?mixres embed (.*)$", DOCS.read_text(), re.M)
    assert len(commands) >= 6
    for line in commands:
        args = parser().parse_args(shlex.split(line))
        config, _ = config_from_args(args) if not args.config else (EmbedConfig(), {})
        assert config.check() is config


def test_a_toml_file_holds_the_same_names_and_flags_win(tmp_path):
    toml = tmp_path / "embed.toml"
    toml.write_text('[embed]\nout = "feats"\nmodel = "tiny-vit"\nnormalize = true\n'
                    'pooled_dtype = "float16"\nmax_batch_tokens = 4096\nlayout = "clip-retrieval"\n')
    args = parser().parse_args(["--config", str(toml), "--max-batch-tokens", "512"])
    config, extra = config_from_args(args)
    assert extra == {"out": "feats", "model": "tiny-vit"}
    assert (config.normalize, config.pooled_dtype, config.layout) == (True, "float16", "clip-retrieval")
    assert config.max_batch_tokens == 512
    toml.write_text("max_image_token = 3\n")
    with pytest.raises(ValueError, match=r"^--config .*embed.toml: unknown setting max_image_token$"):
        config_from_args(parser().parse_args(["--config", str(toml)]))


def test_what_a_resume_may_change_is_not_a_feature():
    features = set(EmbedConfig().features())
    assert {"max_batch_tokens", "num_workers", "device", "engine", "progress"}.isdisjoint(features)
    assert {"decode", "normalize", "pooled_dtype", "layout", "shard_size", "pool"} <= features
    with pytest.raises(ValueError, match="^--shard-size must be >= 1, got 0$"):
        EmbedConfig(shard_size=0).check()
    with pytest.raises(TypeError, match="unknown setting max_token "):
        EmbedConfig.of(max_token=3)
    with pytest.warns(FutureWarning, match="'max_tokens' is now called 'max_image_tokens'"):
        assert EmbedConfig.of(max_tokens=3).max_image_tokens == 3  # what users typed before
