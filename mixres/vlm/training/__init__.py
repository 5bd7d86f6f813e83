"""Training a VLM: the loop (train.py), its config, data order, optimizer, checkpoints.

    mixres.vlm.training.train(config)       the loop (`mixres train CONFIG.toml`)
    config.py      RunConfig: [vlm] [data] [train] tables, type-checked
    run_dir.py     the output folder: no accidental overwrite, resume == the same run
    manifest.py    the JSONL manifest reader (incl. LLaVA records)
    sampler.py     token-budget bins          optim.py       AdamW groups + schedule
    checkpoint.py  save / resume              inference.py   load_run, `mixres generate`
    metrics.py     metrics.jsonl, content accuracy           parallel.py    DDP / FSDP2 / compile
    synthetic.py   the synthetic shapes task and its run's config

The model parts live one level up (mixres/vlm/); nothing here is imported by them
(`mixres.vlm.load_run` is resolved on first use).
"""
