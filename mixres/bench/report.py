"""What every benchmark records next to its numbers: the machine, the versions, the command."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def env_info(device: str = "cpu") -> dict:
    import transformers

    info = {
        "machine": platform.machine(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def command_line() -> str:
    """The command as the user typed it: `mixres ...` or `python -m mixres.bench.X ...`."""
    import sys

    prog = Path(sys.argv[0])
    if prog.name in ("mixres", "__main__.py") and prog.parent.name in ("bin", "mixres"):
        head = "mixres"
    elif prog.parent.name == "bench":
        head = f"python -m mixres.bench.{prog.stem}"
    else:
        head = sys.argv[0]
    import shlex

    return " ".join([head, shlex.join(sys.argv[1:])])  # quoted as typed (JSON arguments)


def write_json(obj: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
