"""The GPU kit's selection: what a bare Python 3.12 GPU box (torch, transformers, timm,
pyarrow) lacks for `mixres bench gpu`, as CPython 3.12 manylinux x86_64 wheels, no Ray."""

import sys

from mixres.bench.gpu_kit import BARE, check_wheels, closure, kit, pip_download_args


def test_kit_is_what_the_suite_needs_less_what_the_box_has():
    pins = kit()
    assert {"vit-pytorch", "einops", "matplotlib", "simplejpeg"} <= set(pins)  # the box lacks these
    have = closure(BARE)
    assert not set(pins) & set(have)  # nothing the box already has (torch, numpy, pillow, ...)
    assert {"torch", "numpy", "pillow", "transformers"} <= set(have)
    assert not any(n.startswith("ray") for n in pins)


def test_pip_is_asked_for_cp312_manylinux_x86_64_wheels_only():
    args = pip_download_args({"einops": "0.8.2"}, "wheels")
    assert args[:3] == [sys.executable, "-m", "pip"] and "--no-deps" in args
    assert "--only-binary=:all:" in args and args[args.index("--python-version") + 1] == "3.12"
    platforms = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    assert all(p == "any" or p.endswith("x86_64") for p in platforms) and "manylinux2014_x86_64" in platforms
    assert args[-1] == "einops==0.8.2"


def test_check_flags_wrong_python_machine_ray_and_weight(tmp_path):
    for name in ("einops-0.8.2-py3-none-any.whl",
                 "simplejpeg-1.9.0-cp312-cp312-manylinux2014_x86_64.whl"):
        (tmp_path / name).write_bytes(b"x")
    assert check_wheels(tmp_path) == []
    (tmp_path / "simplejpeg-1.9.0-cp311-cp311-manylinux2014_x86_64.whl").write_bytes(b"x")
    (tmp_path / "kiwisolver-1.5.1-cp312-cp312-manylinux2014_aarch64.whl").write_bytes(b"x")
    (tmp_path / "ray-2.9.0-py3-none-any.whl").write_bytes(b"x")
    (tmp_path / "big-1.0-py3-none-any.whl").write_bytes(b"\0" * (65 * 2**20))
    problems = "\n".join(check_wheels(tmp_path))
    assert "cp311" in problems and "aarch64" in problems and "Ray" in problems and "MiB" in problems
