"""Training a VLM: the loop (train.py), its config, data order, optimizer, checkpoints.

    mixres.vlm.training.train(config)       the loop (`mixres train CONFIG.toml`)
    config.py      TrainConfig: [data] [train] [freeze] on top of the VLM's config
    manifest.py    the JSONL manifest reader       sampler.py  token-budget bins
    optim.py       AdamW groups + schedule         checkpoint.py  save / resume
    metrics.py     metrics.jsonl, progress         parallel.py    DDP / FSDP2 / compile
    synthetic.py   the synthetic shapes task

The model parts live one level up (mixres/vlm/); nothing here is imported by them.
"""
