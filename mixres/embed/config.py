"""`EmbedConfig`: every setting of `mixres embed`, defined once.

The command line is generated from these fields (flag, help, choices), the library takes
them as keyword arguments of `mixres.embed.embed`, a TOML file given with `--config` holds
the same names, and meta.json records them. A field marked `feature=True` changes the
features on disk, so it is part of an output folder's fingerprint and a resume must keep
it; the others (batch budget, workers, device, engine, ...) only change how fast the
same folder is written, so a resumed run may change them (after an out-of-memory, a
smaller --max-batch-tokens).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from mixres.embed.engines import ENGINES
from mixres.embed.store import LAYOUTS
from mixres.packing import POOLERS
from mixres.renamed import IMAGE_TOKENS, take_renamed

__all__ = ["EmbedConfig", "DEFAULT_MAX_BATCH_TOKENS", "DEFAULT_SHARD_SIZE", "add_config_arguments",
           "config_from_args"]

DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_SHARD_SIZE = 64  # inputs per shard: the unit of crash-safety and of decode/encode overlap
DTYPES = ("float32", "float16")


def _opt(default, help: str, *, feature: bool = False, flag: str | None = None, choices=None,
         type=None, metavar=None, cli: bool = True):
    """A config field and how the command line spells it."""
    meta = dict(help=help, feature=feature, flag=flag, choices=choices, type=type, metavar=metavar, cli=cli)
    return field(default=default, metadata=meta)


def _default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


@dataclass
class EmbedConfig:
    # what the features are (the fingerprint)
    backend: str = _opt("packed", "encoder backend", feature=True)
    select_layer: int = _opt(-1, "-1: last layer; -2: penultimate (LLaVA convention)", feature=True)
    pool: str | None = _opt(None, "pooled vector per image: the model's pooler, the CLS token, the mean of "
                            "the patch tokens, none (default: model for --select-layer -1, else cls "
                            "where the model has a CLS token, else mean)", feature=True,
                            choices=sorted(POOLERS))
    min_image_tokens: int = _opt(1, "smaller images are upscaled to this many tokens", feature=True)
    max_image_tokens: int | None = _opt(1024, "larger images are downscaled to this many tokens",
                                        feature=True)
    max_pixels: int | None = _opt(None, "reject images with more pixels (default: the "
                                  "decompression-bomb guard)", feature=True)
    decode: str = _opt("pil", "how images become tensors: pil (PIL, as the model processors do), fast "
                       "(libjpeg-turbo + antialiased torch resize), cuda (nvJPEG + GPU resize; "
                       "local engine)", feature=True, metavar="NAME")
    dtype: str | None = _opt(None, "run the model in this dtype (default: as loaded)", feature=True,
                             choices=["float32", "float16", "bfloat16"])
    store_dtype: str = _opt("auto", "dtype of the tokens on disk (auto: float16 for fp16 models, else "
                            "float32)", feature=True, choices=["auto", *DTYPES])
    pooled_dtype: str = _opt("auto", "dtype of the pooled vectors on disk (auto: the --store-dtype; "
                             "clip-retrieval writes float16)", feature=True, choices=["auto", *DTYPES])
    normalize: bool = _opt(False, "L2-normalize the pooled vectors (tokens stay as the model gives "
                           "them); what clip-retrieval and inner-product search expect", feature=True,
                           flag="--normalize")
    shard_size: int = _opt(DEFAULT_SHARD_SIZE, "inputs per shard (8 with --demo)", feature=True)
    write_tokens: bool = _opt(True, "write only pooled and metadata files (no token shards)",
                              feature=True, flag="--no-tokens")
    layout: str = _opt("mixres", "file names of pooled vectors and metadata: mixres (pooled/NNNNNN.npy, "
                       "metadata/NNNNNN.parquet) or clip-retrieval (img_emb/img_emb_NNNNNN.npy, "
                       "metadata/metadata_NNNNNN.parquet)", feature=True, choices=list(LAYOUTS))
    # what to read
    image_column: str | None = _opt(None, "parquet / datasets: the column of image bytes or Image "
                                    "structs (default: the only such column)")
    id_column: str | None = _opt(None, "parquet / datasets: the column whose values are the keys "
                                 "(default: <file name>#<row>)")
    limit: int | None = _opt(None, "embed only the first N inputs")
    on_error: str = _opt("skip", "bad inputs: record them in errors.jsonl and go on, or stop",
                         choices=["skip", "fail"])
    # how fast (a resume may change these)
    max_batch_tokens: int | None = _opt(DEFAULT_MAX_BATCH_TOKENS, "token budget of one forward (halved "
                                        "on device out-of-memory)")
    device: str | None = _opt(None, "cpu | cuda | cuda:N (default: cuda if available)")
    num_workers: int = _opt(-1, "DataLoader workers that decode images (default: min(4, CPUs - 1))")
    engine: str = _opt("local", "local: this process + DataLoader workers (torchrun for ranks); ray: Ray "
                       "Data decode tasks and encoder actors (pip install 'mixres[ray]')",
                       choices=ENGINES.names())
    ray_address: str | None = _opt(None, "--engine ray: a cluster to connect to (auto, "
                                   "ray://host:10001, host:6379; default: start a local Ray)")
    ray_actors: int | None = _opt(None, "--engine ray: encoder actors, each holding the model "
                                  "(default: one per GPU, else 1)")
    ray_cpus_per_decode: float = _opt(1.0, "--engine ray: CPUs reserved by each decode task")
    ray_cpus_per_actor: int = _opt(1, "--engine ray: CPUs reserved by each encoder actor (its torch "
                                   "threads on a CPU node)")
    progress: bool = _opt(True, "no progress bar", flag="--no-progress")
    model_name: str | None = _opt(None, "the name meta.json records for the model (library use)",
                                  cli=False)

    def __post_init__(self):
        if self.num_workers is not None and self.num_workers < 0:
            self.num_workers = _default_workers()

    @classmethod
    def of(cls, config: EmbedConfig | None = None, **kwargs) -> EmbedConfig:
        """A config from another one and/or keyword arguments; an unknown name is one line.
        The old spellings min_tokens / max_tokens still work (with a FutureWarning)."""
        kwargs = take_renamed(kwargs, IMAGE_TOKENS, "embed")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"embed: unknown setting {', '.join(unknown)} "
                            f"(settings: {', '.join(sorted(names))})")
        return replace(config, **kwargs) if config is not None else cls(**kwargs)

    def check(self) -> EmbedConfig:
        """Every value checked before any work; each problem is one line naming its flag."""
        def positive(name, value, what=">= 1"):
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {value}")
        positive("shard_size", self.shard_size)
        positive("max_batch_tokens", self.max_batch_tokens)
        positive("ray_actors", self.ray_actors)
        positive("ray_cpus_per_actor", self.ray_cpus_per_actor)
        if self.ray_cpus_per_decode <= 0:
            raise ValueError(f"--ray-cpus-per-decode must be > 0, got {self.ray_cpus_per_decode}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"--limit must be >= 0, got {self.limit}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"--{f.name.replace('_', '-')} {value!r}: "
                                 f"choose one of {', '.join(choices)}")
        if not self.write_tokens and self.pool == "none":
            raise ValueError("--no-tokens keeps only the pooled vectors: choose a --pool other than none")
        if self.normalize and self.pool == "none":
            raise ValueError("--normalize acts on pooled vectors: choose a --pool other than none")
        if self.engine == "ray" and self.decode == "cuda":
            raise ValueError("--engine ray decodes in CPU tasks: use --decode fast or pil with it "
                             "(--decode cuda is for the local engine)")
        return self

    def features(self) -> dict:
        """The fields that change the features on disk (recorded and fingerprinted)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["feature"]}

    def to_dict(self) -> dict:
        return asdict(self)


# the command line and TOML files

def _flag(f) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per field, its help and default taken from the field."""
    for f in fields(EmbedConfig):
        m = f.metadata
        if not m["cli"]:
            continue
        if isinstance(f.default, bool):
            # a flag that flips the default (--normalize, --no-tokens, --no-progress)
            p.add_argument(_flag(f), dest=f.name, action="store_false" if f.default else "store_true",
                           default=argparse.SUPPRESS, help=m["help"])
            continue
        kind = m["type"] or {"int": int, "float": float}.get(f.type.split(" ")[0], str)
        default = "" if f.default is None or f.default is MISSING else f" (default: {f.default})"
        if f.name == "num_workers":
            default = ""
        p.add_argument(_flag(f), dest=f.name, type=kind, choices=m["choices"], metavar=m["metavar"],
                       default=argparse.SUPPRESS, help=m["help"] + default)
    p.add_argument("--config", default=None, metavar="TOML",
                   help="read settings from a TOML file ([embed] table or top level; the names of "
                        "these flags with _ for -); flags given here win")


def _read_toml(path: str) -> dict:
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: not valid TOML ({e})") from None
    data = data.get("embed", data)
    names = {f.name for f in fields(EmbedConfig)} | {"input", "out", "model", "model_kwargs"}
    bad = sorted(set(data) - names)
    if bad:
        raise ValueError(f"--config {path}: unknown setting {', '.join(bad)}")
    return data


def config_from_args(args: argparse.Namespace) -> tuple[EmbedConfig, dict]:
    """(EmbedConfig, the non-config values of the TOML file: input, out, model, model_kwargs)."""
    values = _read_toml(args.config) if getattr(args, "config", None) else {}
    extra = {k: values.pop(k) for k in ("input", "out", "model", "model_kwargs") if k in values}
    names = {f.name for f in fields(EmbedConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return EmbedConfig(**values), extra
