"""mixres.images: every image becomes a sane RGB image or a clear error; every size
becomes a patch grid within the token budget with its aspect ratio kept."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mixres.images import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    load_image,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# helpers

def saved(tmp_path, name: str, img: Image.Image, **kw) -> str:
    path = tmp_path / name
    img.save(path, **kw)
    return str(path)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def stored(path: str) -> tuple[str, dict, int]:
    """(mode, info, frames) of a file as PIL opens it, so tests can check what they wrote."""
    with Image.open(path) as im:
        return im.mode, dict(im.info), getattr(im, "n_frames", 1)


def px(img: Image.Image, x: int = 0, y: int = 0) -> tuple[int, int, int]:
    return img.getpixel((x, y))


def close(a, b, tol: int = 2) -> bool:
    return all(abs(int(u) - int(v)) <= tol for u, v in zip(a, b))


def loads_as_rgb(src, **kw) -> Image.Image:
    img = load_image(src, **kw)
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    return img


# modes: 8-bit, bilevel, palette

def test_rgb_png_roundtrips_exactly(tmp_path):
    arr = np.random.RandomState(0).randint(0, 256, (5, 7, 3), dtype=np.uint8)
    img = loads_as_rgb(saved(tmp_path, "rgb.png", Image.fromarray(arr)))
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_grayscale_l(tmp_path):
    img = loads_as_rgb(saved(tmp_path, "l.png", Image.new("L", (3, 2), 77)))
    assert img.size == (3, 2) and px(img) == (77, 77, 77)


def test_bilevel_1(tmp_path):
    bw = Image.new("1", (4, 1), 0)
    bw.putpixel((2, 0), 1)
    img = loads_as_rgb(saved(tmp_path, "bw.png", bw))
    assert [px(img, x) for x in range(4)] == [(0, 0, 0)] * 2 + [(255, 255, 255), (0, 0, 0)]


def _palette_image() -> Image.Image:
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([*RED, *GREEN] + [0] * (256 - 2) * 3)
    pal.putpixel((1, 0), 1)
    return pal


def test_palette_without_transparency(tmp_path):
    img = loads_as_rgb(saved(tmp_path, "p.png", _palette_image()))
    assert (px(img, 0), px(img, 1)) == (RED, GREEN)


@pytest.mark.parametrize("background", [(255, 255, 255), (10, 20, 30)])
def test_palette_with_transparency_is_composited(tmp_path, background):
    path = saved(tmp_path, "pt.png", _palette_image(), transparency=0)  # index 0 (red) clear
    assert stored(path)[1].get("transparency") is not None
    img = loads_as_rgb(path, background=background)
    assert (px(img, 0), px(img, 1)) == (background, GREEN)


def test_transparent_gif_first_frame(tmp_path):
    frames = [_palette_image(), _palette_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    path = saved(tmp_path, "anim.gif", frames[0], save_all=True, append_images=frames[1:],
                 transparency=1)
    assert stored(path)[2] == 2
    img = loads_as_rgb(path, background=(1, 2, 3))
    assert (px(img, 0), px(img, 1)) == (RED, (1, 2, 3))


def test_multipage_tiff_first_page(tmp_path):
    pages = [Image.new("RGB", (4, 4), BLUE), Image.new("RGB", (8, 8), RED)]
    path = saved(tmp_path, "pages.tiff", pages[0], save_all=True, append_images=pages[1:])
    img = loads_as_rgb(path)
    assert img.size == (4, 4) and px(img) == BLUE


# modes: alpha

def _rgba() -> Image.Image:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 100, 50, 0), (200, 100, 50, 255), (200, 100, 50, 128)])
    return rgba


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 64, 128)])
def test_rgba_alpha_composited_on_background(tmp_path, background):
    img = loads_as_rgb(saved(tmp_path, "a.png", _rgba()), background=background)
    assert px(img, 0) == background  # fully transparent: only the background
    assert px(img, 1) == (200, 100, 50)  # opaque: untouched
    half = [(c * 128 + b * 127) / 255 for c, b in zip((200, 100, 50), background)]
    assert close(px(img, 2), half, tol=1)


def test_rgba_default_background_is_white(tmp_path):
    assert px(loads_as_rgb(saved(tmp_path, "a.png", _rgba()))) == (255, 255, 255)


def test_la(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (100, 255)])
    img = loads_as_rgb(saved(tmp_path, "la.png", la), background=(9, 9, 9))
    assert (px(img, 0), px(img, 1)) == ((9, 9, 9), (100, 100, 100))


def test_grayscale_with_trns_colour(tmp_path):
    path = saved(tmp_path, "ltrns.png", Image.new("L", (1, 1), 40), transparency=40)
    assert px(loads_as_rgb(path, background=(1, 2, 3))) == (1, 2, 3)


def test_palette_alpha_pa_in_memory():
    pa = Image.new("RGBA", (2, 1), (50, 60, 70, 0)).convert("PA")
    pa.putpixel((1, 0), (0, 255))
    img = loads_as_rgb(pa, background=(1, 2, 3))
    assert px(img, 0) == (1, 2, 3) and px(img, 1) == pa.convert("RGB").getpixel((1, 0))


@pytest.mark.parametrize("mode, clear, half", [
    ("RGBa", (50, 60, 70, 0), (45, 45, 45, 128)),
    ("La", (50, 0), (45, 128)),
])
def test_premultiplied_alpha_in_memory(mode, clear, half):
    # premultiplied 45 at alpha 128 is a straight 89-90 at half opacity
    assert px(loads_as_rgb(Image.new(mode, (1, 1), clear), background=(1, 2, 3))) == (1, 2, 3)
    blended = px(loads_as_rgb(Image.new(mode, (1, 1), half), background=(0, 0, 0)))
    assert close(blended, (45, 45, 45), tol=1)


# modes: colour spaces

def test_cmyk_jpeg(tmp_path):
    # PIL writes CMYK JPEGs Adobe-style (inverted); the decoder un-inverts them
    path = saved(tmp_path, "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)))
    assert stored(path)[0] == "CMYK"
    assert close(px(loads_as_rgb(path)), RED, tol=8)


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB"])
def test_colour_spaces(mode):
    colour = (200, 30, 60)
    img = Image.new("RGB", (2, 2), colour).convert(mode)
    assert close(px(loads_as_rgb(img)), colour, tol=3)


# modes: high bit depth

def test_16bit_png_scaled_by_257(tmp_path):
    arr = np.array([[0, 257 * 100, 65535, 257 * 100 + 128]], dtype=np.uint16)
    path = saved(tmp_path, "16.png", Image.fromarray(arr))
    assert stored(path)[0].startswith("I")
    img = loads_as_rgb(path)
    assert [px(img, x)[0] for x in range(4)] == [0, 100, 255, 100]


def test_16bit_big_endian_in_memory():
    big = Image.frombytes("I;16B", (2, 1), np.array([25700, 65535], ">u2").tobytes())
    img = loads_as_rgb(big)
    assert (px(img, 0), px(img, 1)) == ((100,) * 3, (255,) * 3)


def test_32bit_int_tiff_clipped_to_16bit_range(tmp_path):
    arr = np.array([[-5, 25700, 65535, 70000]], dtype=np.int32)
    path = saved(tmp_path, "i32.tiff", Image.fromarray(arr))
    assert stored(path)[0] == "I"
    img = loads_as_rgb(path)
    assert [px(img, x)[0] for x in range(4)] == [0, 100, 255, 255]


@pytest.mark.parametrize("values, expected", [
    ([0.0, 0.5, 1.0, 0.2], [0, 128, 255, 51]),  # max <= 1: normalized, x 255
    ([0.0, 100.0, 300.0, -4.0], [0, 100, 255, 0]),  # max > 1: 8-bit scale, clipped
    ([float("nan"), 0.5, 1.0, 0.0], [0, 128, 255, 0]),  # NaN -> 0
])
def test_float_tiff(tmp_path, values, expected):
    path = saved(tmp_path, "f.tiff", Image.fromarray(np.array([values], dtype=np.float32)))
    assert stored(path)[0] == "F"
    img = loads_as_rgb(path)
    assert [px(img, x)[0] for x in range(4)] == expected


# EXIF orientation

def test_exif_orientation_6_rotates(tmp_path):
    # 64 wide x 32 tall, red block at the top-left; orientation 6 = "rotate 90 CW to view"
    raw = Image.new("RGB", (64, 32), BLUE)
    raw.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = saved(tmp_path, "rot.jpg", raw, exif=exif, quality=95)
    img = loads_as_rgb(path)
    assert img.size == (32, 64)
    assert close(px(img, 32 - 8, 8), RED, tol=20)  # top-left went to the top-right
    assert close(px(img, 8, 8), BLUE, tol=20)


def test_pil_input_is_not_modified():
    src = _rgba()
    out = load_image(src)
    assert out is not src and src.mode == "RGBA" and px(src) == (200, 100, 50, 0)


# sources

def test_sources_agree(tmp_path):
    arr = np.random.RandomState(1).randint(0, 256, (6, 9, 3), dtype=np.uint8)
    path = saved(tmp_path, "s.png", Image.fromarray(arr))
    data = Path(path).read_bytes()
    with open(path, "rb") as f, Image.open(path) as lazy:
        for src in [path, Path(path), data, bytearray(data), memoryview(data), io.BytesIO(data),
                    f, lazy, Image.fromarray(arr)]:
            np.testing.assert_array_equal(np.asarray(load_image(src)), arr)


def test_unsupported_source_type_is_type_error():
    with pytest.raises(TypeError, match="int"):
        load_image(42)
    with pytest.raises(TypeError, match="binary mode"):
        load_image(io.StringIO("hello"))


def test_bad_background():
    with pytest.raises(ValueError, match="background"):
        load_image(Image.new("RGB", (1, 1)), background=(0, 0, 256))


# bad files

def _photo_bytes(fmt: str) -> bytes:
    arr = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    return encoded(Image.fromarray(arr), fmt)


def _expect(src, *reason: str, name: str | None = None, **kw) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(src, **kw)
    msg = str(info.value)
    assert (name or str(src)) in msg
    assert any(r in msg for r in reason), msg
    return info.value


def test_load_error_is_value_error():
    assert issubclass(ImageLoadError, ValueError)


def test_missing_path(tmp_path):
    _expect(str(tmp_path / "nope.jpg"), "no such file")


def test_directory_path(tmp_path):
    _expect(str(tmp_path), "directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _expect(str(path), "empty file")
    _expect(b"", "empty file", name="<bytes>")


def test_text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n")
    _expect(str(path), "not an image")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.RandomState(0).randint(128, 256, 500, dtype=np.uint8).tobytes())
    _expect(str(path), "not an image", "corrupt")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_corrupt_data_after_valid_header(tmp_path, fmt):
    data = bytearray(_photo_bytes(fmt))
    data[len(data) // 4: len(data) // 2] = b"\xff" * (len(data) // 2 - len(data) // 4)
    path = tmp_path / f"corrupt.{fmt.lower()}"
    path.write_bytes(bytes(data))
    _expect(str(path), "corrupt", "truncated")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    data = _photo_bytes(fmt)
    path = tmp_path / f"half.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    _expect(str(path), "truncated")
    _expect(io.BytesIO(data[: len(data) // 2]), "truncated", name="<file-like>")


def test_decompression_bomb_refused_from_header(tmp_path):
    path = saved(tmp_path, "big.png", Image.new("L", (3000, 3000)))
    err = _expect(path, "too large", max_pixels=1_000_000)
    assert "3000x3000" in str(err)
    # only the header survives: refused before any pixel is decoded, so not "truncated"
    head = tmp_path / "big_head.png"
    head.write_bytes(Path(path).read_bytes()[:64])
    _expect(str(head), "too large", max_pixels=1_000_000)
    assert load_image(path, max_pixels=None).size == (3000, 3000)


def test_bomb_guard_on_pil_input():
    _expect(Image.new("RGB", (100, 100)), "too large", name="<PIL image>", max_pixels=9999)


def test_pil_global_limit_neither_applies_nor_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = saved(tmp_path, "mid.png", Image.new("L", (100, 100)))  # PIL alone would refuse
    assert load_image(path).size == (100, 100)
    _expect(path, "too large", max_pixels=10)
    assert Image.MAX_IMAGE_PIXELS == 1000
    assert DEFAULT_MAX_PIXELS == 89_478_485
