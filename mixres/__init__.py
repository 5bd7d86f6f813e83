"""mixres: vision features from images of mixed sizes, without padding.

    enc = mixres.load_encoder(model, backend="packed")   # HF model | path | hub id | preset
    feats = enc.encode(images)                            # PackedFeatures
    feats = mixres.encode(images, model="tiny-vit")       # one call, inference, pooled as asked
    pre = mixres.Preprocessor(enc.facts, decode="fast")   # images -> normalized (C, H, W)
    report = mixres.check_invariance(model, images)       # verify a checkpoint

Heavier parts (extraction, VLM) are imported on first use.
"""

from mixres.encoders import encode, list_backends, load_encoder
from mixres.packing import PackedFeatures, PackedImages, pack_into_bins
from mixres.registry import lazy_attributes

__version__ = "0.1.0"

# name -> module that defines it, imported on first attribute access
_LAZY = {
    "ImageLoadError": "mixres.images",
    "load_image": "mixres.images",
    "Preprocessor": "mixres.preprocess",
    "read_features": "mixres.embed.reader",
    "check_invariance": "mixres.invariance",
    "InvarianceReport": "mixres.invariance",
    "load_model": "mixres.loading",
    "patch_vit": "mixres.masked_vit_patcher",
    "unpatch_vit": "mixres.masked_vit_patcher",
    "encode_images": "mixres.batch_image_encoder",
    "encode_nested": "mixres.batch_image_encoder",
    # importing mixres.models.navit registers "navit" with AutoConfig/AutoModel; it pulls in
    # vit-pytorch (and torchvision), so it is not imported by `import mixres` itself
    "NaViTConfig": "mixres.models.navit",
    "NaViTModel": "mixres.models.navit",
}

__all__ = ["PackedFeatures", "PackedImages", "pack_into_bins", "load_encoder", "encode", "list_backends",
           *_LAZY]

__getattr__ = lazy_attributes(__name__, _LAZY)
