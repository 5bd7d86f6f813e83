"""Loose image files: a folder, a text file of paths, a JSONL with a `path` field, a list, one image.

The key of an item is its absolute path (what `read_features` has always been keyed by).
Relative entries of a list file are relative to the list file, so a list can travel with
its images. A folder scan lists every path whose name says "image", including those that
cannot be read as one (a dangling link, a link loop, a directory named x.jpg, an .svg):
each of those becomes a row of errors.jsonl with its reason, so nothing is dropped without
a word.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from mixres.embed.sources.base import Source, Unit

__all__ = ["IMAGE_EXTENSIONS", "UNSUPPORTED_EXTENSIONS", "FileSource", "collect_inputs", "resolve_entry"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm", ".jfif", ".ico", ".tga", ".avif", ".heic",
                              ".heif"})
# images neither PIL nor TorchCodec decodes: listed by a folder scan, so each is reported rather than dropped
UNSUPPORTED_EXTENSIONS = frozenset({".svg", ".svgz", ".jxl", ".psd", ".raw",
                                    ".cr2", ".nef", ".arw", ".dng", ".eps", ".exr", ".hdr"})


def _from_folder(root: Path) -> list[str]:
    found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS | UNSUPPORTED_EXTENSIONS]
    return [os.path.abspath(p) for p in sorted(found, key=lambda p: p.relative_to(root).as_posix())]


def resolve_entry(entry: str | os.PathLike, base: Path) -> Path:
    """A path from a list or manifest file: relative entries are relative to the file's folder."""
    p = Path(entry).expanduser()
    return p if p.is_absolute() else base / p


def _resolve(entry: str, base: Path) -> str:
    return os.path.abspath(resolve_entry(entry, base))


def _from_jsonl(path: Path, lines: list[str]) -> list[str]:
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise ValueError(f"{path}:{n}: expected an object with a string 'path' field, got {line[:80]!r}")
        out.append(_resolve(row["path"], path.parent))
    return out


def collect_inputs(source, limit: int | None = None) -> list[str]:
    """INPUT -> absolute paths, in order, duplicates dropped (first kept).

    source  a folder (recursive; files with an image extension, sorted by relative path),
            one image file, a .jsonl file (or any file whose first line is a JSON object)
            with a `path` field per line, a text file with one path per line (blank lines
            and lines starting with # are skipped), or a list of paths
    """
    if isinstance(source, (list, tuple)):
        paths = [os.path.abspath(os.fspath(p)) for p in source]
    else:
        src = Path(source).expanduser()
        if src.is_dir():
            paths = _from_folder(src)
            if not paths:
                raise ValueError(f"INPUT {source}: no image files in this folder or below "
                                 f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        elif src.is_file() and src.suffix.lower() in IMAGE_EXTENSIONS:
            paths = [os.path.abspath(src)]  # one image: a list of one
        elif src.is_file():
            lines = src.read_text().splitlines()
            first = next((x for x in lines if x.strip()), "")
            if src.suffix.lower() == ".jsonl" or first.lstrip().startswith("{"):
                paths = _from_jsonl(src, lines)
            else:
                paths = [_resolve(x.strip(), src.parent) for x in lines
                         if x.strip() and not x.lstrip().startswith("#")]
        else:
            raise FileNotFoundError(f"INPUT {source}: no such folder or file (expected a folder of "
                                    "images, a text file of paths, a JSONL with a 'path' field, .tar "
                                    "shards, parquet files or a datasets folder)")
    paths = list(dict.fromkeys(paths))
    if limit is not None:
        if limit < 0:
            raise ValueError(f"--limit must be >= 0, got {limit}")
        paths = paths[:limit]
    return paths


def read_path(path: str) -> bytes:
    """The bytes of an image file, or ValueError(why it is not one)."""
    p = Path(path)
    if p.suffix.lower() in UNSUPPORTED_EXTENSIONS:
        raise ValueError(f"unsupported image type {p.suffix.lower()} (supported: "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    try:
        return p.read_bytes()
    except FileNotFoundError:
        if p.is_symlink():
            raise ValueError(f"dangling symbolic link (to {os.readlink(p)})") from None
        raise ValueError("no such file") from None
    except IsADirectoryError:
        raise ValueError("is a directory, not an image file") from None
    except PermissionError:
        raise ValueError("unreadable path (permission denied)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError("symbolic link loop") from None
        raise ValueError(f"unreadable path ({e.strerror or e})") from None


class FileSource(Source):
    """Items are files; key = absolute path. A grown list resumes (checked item by item)."""

    kind = "files"

    def __init__(self, spec, paths: list[str]):
        name = spec if isinstance(spec, (str, os.PathLike)) else "<list>"
        super().__init__(os.fspath(name), paths, [Unit(os.fspath(name), len(paths))], [])

    def unit_of(self, pos: int) -> str:
        return self.keys[pos]  # the file the bytes come from, as for every source

    def read(self, pos: int) -> tuple[bytes, dict]:
        return read_path(self.keys[pos]), {}

    def describe(self) -> dict:
        # no counts: a longer list or a larger --limit continues the same folder, as it always has
        return {"kind": self.kind}
