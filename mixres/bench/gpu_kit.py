"""The wheels `mixres bench gpu` needs on a bare GPU box, chosen here and fetched with pip.

The GPU machine lent to this project has Python 3.12 with torch, transformers, timm and
pyarrow (and what they pull in) and no network. Everything else `mixres bench gpu` imports
travels with the checkout as wheels: the dependency closure of what the suite needs, less
the closure of what the box has, pinned to the versions installed here (the versions the
tests pass with), for CPython 3.12 on manylinux x86_64. Never Ray (the suite does not use
it, and its wheel alone is over the 64 MiB the kit may weigh).

    python -m mixres.bench.gpu_kit list                     # what it would fetch
    python -m mixres.bench.gpu_kit download --dest benchmarks/gpu/wheels
(benchmarks/gpu/prepare.sh runs the second; benchmarks/gpu/run.sh installs and runs.)
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

__all__ = ["SUITE", "BARE", "TARGET", "closure", "kit", "pip_download_args", "check_wheels"]

# what `mixres bench gpu` imports (mixres' own dependencies, the fast decoder's simplejpeg)
SUITE = ("torch", "transformers", "vit-pytorch", "pillow", "numpy", "safetensors", "tqdm",
         "matplotlib", "pyarrow", "simplejpeg")
BARE = ("torch", "transformers", "timm", "pyarrow")  # what the box has, with their dependencies
NEVER = ("ray",)
TARGET = {"python": "3.12", "abi": "cp312", "platforms": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                                                          "manylinux2014_x86_64", "manylinux1_x86_64")}
MAX_BYTES = 64 * 2**20


def _environment() -> dict:
    env = default_environment()
    env.update(python_version=TARGET["python"], python_full_version=TARGET["python"] + ".0",
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
               os_name="posix", implementation_name="cpython", platform_python_implementation="CPython")
    return env


def closure(names, env: dict | None = None) -> dict[str, str]:
    """{canonical name: installed version} of `names` and everything they require on the
    target (markers evaluated for Linux x86_64, Python 3.12; extras not followed)."""
    env = env or _environment()
    seen: dict[str, str] = {}
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError as e:
            raise ValueError(f"gpu kit: {name!r} is not installed here; install mixres[test] first") from e
        seen[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def kit(suite=SUITE, bare=BARE) -> dict[str, str]:
    """{name: version} the box lacks: the suite's closure less the box's."""
    have = closure(bare)
    need = {n: v for n, v in closure(suite).items() if n not in have}
    bad = [n for n in need if n in NEVER]
    if bad:
        raise ValueError(f"gpu kit: {bad} would be fetched; the kit carries no Ray")
    return dict(sorted(need.items()))


def pip_download_args(pins: dict[str, str], dest: str | Path) -> list[str]:
    """pip download of exactly these wheels (no dependencies resolved, no sdists)."""
    args = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--python-version", TARGET["python"], "--implementation", "cp", "--abi", TARGET["abi"],
            "--abi", "abi3", "--abi", "none"]
    for p in TARGET["platforms"]:
        args += ["--platform", p]
    args += ["--platform", "any", "--dest", str(dest)]
    return args + [f"{n}=={v}" for n, v in pins.items()]


def check_wheels(folder: str | Path) -> list[str]:
    """Problems with a downloaded kit: a wheel for another Python or machine, Ray, too big."""
    files = sorted(Path(folder).glob("*.whl"))
    problems = []
    for f in files:
        _, _, py, abi, plat = f.stem.rsplit("-", 4) if f.stem.count("-") >= 4 else ("", "", "", "", "")
        if canonicalize_name(f.name.split("-")[0]) in NEVER:
            problems.append(f"{f.name}: Ray is never carried")
        if not (py in ("py3", "py2.py3", "cp312") or py.startswith("cp3") and abi == "abi3"):
            problems.append(f"{f.name}: not for CPython 3.12")
        if plat != "any" and "x86_64" not in plat:
            problems.append(f"{f.name}: not for x86_64")
    size = sum(f.stat().st_size for f in files)
    if size > MAX_BYTES:
        problems.append(f"the kit weighs {size / 2**20:.1f} MiB, over {MAX_BYTES / 2**20:.0f} MiB")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mixres.bench.gpu_kit", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["list", "download", "check"])
    ap.add_argument("--dest", default="benchmarks/gpu/wheels")
    args = ap.parse_args(argv)
    if args.action == "check":
        problems = check_wheels(args.dest)
        print("\n".join(problems) or f"{args.dest}: ok")
        return 1 if problems else 0
    pins = kit()
    if args.action == "list":
        print("\n".join(f"{n}=={v}" for n, v in pins.items()))
        return 0
    Path(args.dest).mkdir(parents=True, exist_ok=True)
    subprocess.run(pip_download_args(pins, args.dest), check=True)
    problems = check_wheels(args.dest)
    print("\n".join(problems) or f"{len(pins)} wheels in {args.dest}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
