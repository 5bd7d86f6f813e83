"""DeiT (HF `DeiTModel`): ViT's recipe with a distillation token after CLS.

HF's DeiTEmbeddings always prepends it (non-distilled DeiT checkpoints are plain "vit"
configs). Checkpoints ship ImageNet statistics although HF's processor class defaults to 0.5.
"""

from __future__ import annotations

from mixres.families import FamilySpec, register_family
from mixres.families.common import patch_call
from mixres.families.spec import IMAGENET_DEFAULT
from mixres.families.vit import RECIPE

SPEC = register_family(FamilySpec("deit", IMAGENET_DEFAULT, prefix_tokens=lambda tower: 2,
                                  call=patch_call(), recipe=RECIPE))
