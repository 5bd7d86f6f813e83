"""Training a VLM in steps: build, train_step, evaluate, save, and the loop that calls them.

    train.py       build / restore / save and the loop, `train(config, out)`
    step.py        train_step: one update over every rank's micro-batches
    evaluate.py    held-out loss and content accuracy
    data.py        the run's datasets (manifest | synthetic), token counts, loaders
    cli.py         `mixres train` (reference: docs/train.md)
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
