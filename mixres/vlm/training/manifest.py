"""Training data from a JSONL manifest: one sample per line, images relative to the manifest.

    {"images": ["a.jpg", "sub/b.png"], "text": "<image> <image> two photos of cats"}
    {"images": ["c.jpg"], "prompt": "<image>\\nWhat is this?", "response": "A dog."}
    {"text": "a line of plain text, no image"}
    {"image": "d.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                         {"from": "gpt", "value": "A bird."}, ...]}   (LLaVA)

`text` samples are trained on every token; `prompt`/`response` samples only on the
response; LLaVA `conversations` (with `image` or `images`) only on the gpt turns, rendered
with the tokenizer's chat template where it has one (mixres.vlm.chat).
Image paths are relative to the manifest's folder (absolute paths are kept).
Each `<image>` placeholder marks where one image's tokens go, in order. With
`placeholders="require"` their number must equal the number of images; with "prepend"
(the default) a sample with images and no placeholder at all gets them prepended, one per
image, and any other mismatch is an error.

Everything is checked when the manifest is read, not later inside a batch: bad JSON, a
missing field, a missing or unreadable image, a placeholder mismatch. The error is a
`ManifestError` (a ValueError) that names the file and the line. Image sizes are read
from the file headers there too (no decoding), so token budgets can be planned before
any worker loads a pixel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mixres.embed.sources.files import resolve_entry
from mixres.vlm.chat import to_messages
from mixres.vlm.layout import IMAGE_TOKEN
from mixres.vlm.training.metrics import word_spans

__all__ = ["ManifestError", "Record", "read_manifest", "ManifestDataset", "datasets", "IMAGE_TOKEN"]

PLACEHOLDER_POLICIES = ("prepend", "require")
# EXIF orientations that swap width and height (load_image applies them)
_TRANSPOSED = {5, 6, 7, 8}


class ManifestError(ValueError):
    """A manifest line is unusable; the message names the file, the line and the reason."""

    def __init__(self, path, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


@dataclass
class Record:
    """One manifest sample. `prompt` is not trained on; `response` is. A `text` sample
    (is_text) has an empty prompt and its placeholders in `response`."""

    images: list[Path]
    prompt: str
    response: str
    line: int
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) per image
    is_text: bool = False
    conversations: list[dict] | None = None                     # LLaVA turns, as given


# helpers

def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # a malformed EXIF block: load_image ignores it too
            orientation = 1
    return (w, h) if orientation in _TRANSPOSED else (h, w)


def _image_files(images: list[str], path: Path, line: int) -> tuple[list[Path], list[tuple[int, int]]]:
    """Resolved image paths and their (height, width), each checked."""
    files, sizes = [], []
    for name in images:
        p = resolve_entry(name, path.parent)  # the rule of `mixres embed`'s list files
        if p.is_dir():
            raise ManifestError(path, line, f"image {name!r} is a directory, not an image file ({p})")
        if not p.is_file():
            raise ManifestError(path, line, f"image {name!r} not found (looked at {p})")
        try:
            sizes.append(_image_size(p))
        except (UnidentifiedImageError, OSError) as e:
            raise ManifestError(path, line, f"image {name!r} cannot be read: {e}") from None
        files.append(p)
    return files, sizes


def _images_field(obj: dict, path: Path, line: int) -> list[str]:
    if "image" in obj and "images" in obj:
        raise ManifestError(path, line, "give 'image' or 'images', not both")
    images = obj.get("images", obj.get("image", []))
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise ManifestError(path, line, "'images' must be a list of path strings")
    return images


def _parse_llava(obj: dict, path: Path, line: int, placeholders: str) -> Record:
    """A LLaVA record: image|images + conversations [{"from": "human"|"gpt", "value"}]."""
    images = _images_field(obj, path, line)
    try:
        msgs = to_messages(obj["conversations"], "'conversations'")
    except ValueError as e:
        raise ManifestError(path, line, str(e)) from None
    turns = [dict(t) for t in obj["conversations"]]
    if any(IMAGE_TOKEN in m["content"] for m in msgs if m["role"] == "assistant"):
        raise ManifestError(path, line, f"{IMAGE_TOKEN} belongs in a human turn, not a gpt turn")
    n_ph = sum(m["content"].count(IMAGE_TOKEN) for m in msgs)
    if n_ph != len(images):
        if n_ph == 0 and placeholders == "prepend":
            first = next(i for i, m in enumerate(msgs) if m["role"] != "assistant") if any(
                m["role"] != "assistant" for m in msgs) else None
            if first is None:
                raise ManifestError(path, line, "images but no human turn to hold their placeholders")
            key = "value" if "value" in turns[first] else "content"
            turns[first][key] = IMAGE_TOKEN * len(images) + "\n" + turns[first][key]
        else:
            raise ManifestError(path, line, f"{len(images)} image(s) but {n_ph} {IMAGE_TOKEN} "
                                            f"placeholder(s) in the human turns; each image needs one")
    files, sizes = _image_files(images, path, line)
    last = [m["content"] for m in msgs if m["role"] == "assistant"][-1]
    return Record(files, "", last, line, sizes, conversations=turns)


def _parse_line(raw: str, path: Path, line: int, placeholders: str) -> Record:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ManifestError(path, line, f"bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ManifestError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        return _parse_llava(obj, path, line, placeholders)
    images = _images_field(obj, path, line)
    has_text = "text" in obj
    has_pair = "prompt" in obj or "response" in obj
    if has_text == has_pair:
        raise ManifestError(path, line, "expected either 'text' or 'prompt' + 'response' "
                                        f"(got keys {sorted(obj)})")
    if has_text:
        prompt, response = "", obj["text"]
    else:
        prompt, response = obj.get("prompt", ""), obj.get("response")
        if response is None:
            raise ManifestError(path, line, "'prompt' given without 'response'")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ManifestError(path, line, "'text', 'prompt' and 'response' must be strings")
    if IMAGE_TOKEN in response and not has_text:
        raise ManifestError(path, line, f"{IMAGE_TOKEN} belongs in the prompt, not the response")
    n_ph = (prompt + response).count(IMAGE_TOKEN)
    if n_ph != len(images):
        if n_ph == 0 and placeholders == "prepend":
            prompt = IMAGE_TOKEN * len(images) + prompt
        else:
            where = "'text'" if has_text else "'prompt'"
            raise ManifestError(path, line, f"{len(images)} image(s) but {n_ph} {IMAGE_TOKEN} "
                                            f"placeholder(s) in {where}; each image needs one")
    if not response.strip():
        raise ManifestError(path, line, "empty text: nothing to train on")
    files, sizes = _image_files(images, path, line)
    if has_text:
        # everything trains; the placeholders stay where the user put them
        return Record(files, "", prompt + response, line, sizes, is_text=True)
    return Record(files, prompt, response, line, sizes)


def read_manifest(path, placeholders: str = "prepend", limit: int | None = None) -> list[Record]:
    """All records of a JSONL manifest (blank lines and lines starting with # skipped)."""
    path = Path(path)
    if placeholders not in PLACEHOLDER_POLICIES:
        raise ValueError(f"placeholders must be one of {PLACEHOLDER_POLICIES}, got {placeholders!r}")
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            records.append(_parse_line(raw, path, line, placeholders))
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ManifestError(path, 0, "the manifest has no samples")
    return records


class ManifestDataset:
    """Records as training items (same layout as `SyntheticShapes` items).

    Item i -> {"images": [Path, ...], "prompt": str, "response": str, "content_spans": [...]}
    (or "text" instead of prompt/response for `text` records, "conversations" for LLaVA
    records), where content spans are all words of the response (manifests carry no word
    labels).
    """

    def __init__(self, records: list[Record], path=None):
        self.records, self.path = records, path

    @classmethod
    def from_file(cls, path, placeholders: str = "prepend", limit: int | None = None):
        return cls(read_manifest(path, placeholders, limit), path)

    def __len__(self) -> int:
        return len(self.records)

    def image_sizes(self, index: int) -> list[tuple[int, int]]:
        return list(self.records[index].sizes)

    def text_of(self, index: int) -> dict:
        """The item's text fields (its images are paths; nothing is loaded either way)."""
        return {k: v for k, v in self[index].items() if k in ("text", "prompt", "response", "conversations")}

    def __getitem__(self, index: int) -> dict:
        r = self.records[index]
        item = {"images": list(r.images), "source": f"{self.path}:{r.line}"}
        if r.conversations is not None:
            # content accuracy reads prompt/response records; a conversation has no one response
            return {**item, "conversations": r.conversations}
        if r.is_text:
            return {**item, "text": r.response}
        return {**item, "prompt": r.prompt, "response": r.response,
                "content_spans": word_spans(r.response)}


def datasets(cfg) -> tuple[ManifestDataset, ManifestDataset | None]:
    """(train, eval or None) of a run whose [data] table names a manifest."""
    d = cfg.data
    if d.manifest is None:
        raise ValueError("training config: set data.manifest (a JSONL file) or data.synthetic (a count)")
    train = ManifestDataset.from_file(cfg.resolve(d.manifest), d.placeholders)
    if not d.eval_manifest:
        return train, None
    return train, ManifestDataset.from_file(cfg.resolve(d.eval_manifest), d.placeholders)
