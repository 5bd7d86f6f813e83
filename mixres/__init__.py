"""mixres: vision features from images of mixed sizes, without padding."""

from mixres.packing import PackedFeatures, PackedImages, pack_into_bins

__all__ = ["PackedFeatures", "PackedImages", "pack_into_bins"]
__version__ = "0.1.0"
