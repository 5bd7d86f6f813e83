"""Bytes PIL cannot identify: HEIF-family files (HEIC) go to TorchCodec; the rest get a reason.

PIL (>= 11.3) opens AVIF itself, but HEIC only with a plugin. TorchCodec decodes both (HEIC
with libheif installed), so a HEIF-family file PIL refuses gets a second decoder before
`mixres.images.load_image` gives up; anything else is refused with a reason a user can act on.
"""

from __future__ import annotations

from PIL import Image

__all__ = ["decode_unidentified"]

# ISO-BMFF major brands of the HEIF family (HEIC, HEIF image sequences, AVIF)
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis")


def decode_unidentified(data: bytes) -> Image.Image:
    """An RGB PIL image of a HEIF-family file (its first image), decoded by TorchCodec.
    Raises ValueError(reason) for anything else, or for HEIF that cannot be decoded here."""
    brand = data[8:12]
    if data[4:8] != b"ftyp" or brand not in HEIF_BRANDS:
        return _refuse(data)
    try:
        from torchcodec.decoders import decode_image

        chw = decode_image(data, mode="RGB")
    except Exception as e:  # torchcodec or libheif missing, or a corrupt file
        raise ValueError(f"a {brand.decode()} (HEIF) image that neither PIL nor TorchCodec can "
                         f"decode here ({type(e).__name__}: {str(e)[:120]}); HEIC needs libheif "
                         "(conda install -c conda-forge libheif)") from None
    if chw.ndim == 4:  # an image sequence: its first image, as for GIF and TIFF
        chw = chw[0]
    return Image.fromarray(chw.permute(1, 2, 0).contiguous().numpy())


def _refuse(data: bytes):
    try:
        data[:512].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not an image, or a corrupt one (PIL cannot identify the format)") from None
    raise ValueError("not an image (the file holds text)")
