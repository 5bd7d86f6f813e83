"""Models mixres defines itself (NaViT as a transformers model)."""
