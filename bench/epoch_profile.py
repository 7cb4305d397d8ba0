#!/usr/bin/env python
"""Where one training epoch's time goes: the parts of `training.fit`'s epoch timed apart, and A/B variants of the step.

For one recipe (the quick profile's, with `--set` changes) on the data stage's 54,000 training images, each part is
measured in this one process, with the process's CPU seconds (user + system, all threads) and the host's steal
(`/proc/stat`) beside the wall seconds:

- `augment`: producing one epoch's augmented batches in NumPy (`preprocessing.epoch_batches`), nothing else;
- `steps`: the compiled train steps alone, on batches made beforehand (the floor of an epoch);
- `epoch`: an epoch as `fit` runs it (tf.data generator + distribution strategy + steps);
- `validation`: the per-epoch validation on the 6,000 validation images;
- `steps jit` and `steps bs=512`: the step compiled with XLA (`jit_compile=True`), and at twice the batch size.

The step variants are timed in alternating blocks (A B A B …) so that the host's throttling falls on both alike; the
table gives the median of the blocks, per 54,000 images.

    .venv/bin/python bench/epoch_profile.py                       # the quick recipe
    .venv/bin/python bench/epoch_profile.py --set '{"convs": 2, "residual": false}' --blocks 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from bench_host import host, steal_seconds
from train_recipe import profile_recipe, with_changes

from fmnist_gcp.config import Settings
from fmnist_gcp.data import load_split, read_split
from fmnist_gcp.preprocessing import epoch_batches
from fmnist_gcp.training import (build_model, epoch_dataset, make_optimizer, make_train_step, validation_metrics)


class Clock:
    "Wall, process CPU and host steal seconds over a block."
    def __enter__(self):
        self.w, self.c, self.s = time.perf_counter(), time.process_time(), steal_seconds(); return self
    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c
        self.steal = steal_seconds() - self.s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="quick")
    ap.add_argument("--set", default="{}", help="TrainConfig changes as JSON")
    ap.add_argument("--blocks", type=int, default=3, help="alternating blocks per variant (median quoted)")
    ap.add_argument("--block-steps", type=int, default=40, help="train steps per block")
    a = ap.parse_args(argv)
    import tensorflow as tf
    cfg = with_changes(profile_recipe(a.recipe), json.loads(a.set))
    s = Settings.from_env()
    xa, ya = load_split("train")
    try: tr, va = read_split(s)  # the data stage's split
    except FileNotFoundError: tr, va = np.arange(54000), np.arange(54000, 60000)
    x, y, xv, yv = xa[tr], ya[tr], xa[va], ya[va]
    n = len(x)
    rows = {}
    def row(name, clk, scale=1.0):
        rows.setdefault(name, []).append((clk.wall * scale, clk.cpu * scale, clk.steal * scale))

    strategy = tf.distribute.get_strategy()
    variants = {}
    for name, bs, jit in (("steps", cfg.batch_size, False), ("steps jit", cfg.batch_size, True),
                          ("steps bs=512", 512, False)):
        from dataclasses import replace
        c = replace(cfg, batch_size=bs)
        model = build_model(c, 0.286, 0.353)
        opt = make_optimizer(c, 10_000); opt.build(model.trainable_variables)
        step = make_train_step(model, opt, c, strategy)
        if jit: step = tf.function(step.python_function, jit_compile=True)
        batches = [(tf.constant(xb), tf.constant(yb)) for xb, yb in epoch_batches(x[:bs * a.block_steps], y[:bs * a.block_steps], bs, 0, 0, c.augment)]
        float(step(*batches[0]))  # trace
        variants[name] = (step, batches, bs, model)
    for _ in range(a.blocks):
        for name, (step, batches, bs, _) in variants.items():
            with Clock() as clk:
                for xb, yb in batches: float(step(xb, yb))
            row(name, clk, n / (bs * len(batches)))
        with Clock() as clk:
            for _b in epoch_batches(x, y, cfg.batch_size, 0, 1, cfg.augment): pass
        row("augment", clk)
        model = variants["steps"][3]
        with Clock() as clk: validation_metrics(model, xv, yv)
        row("validation", clk)
    # one whole epoch as fit runs it (tf.data + strategy), with the "steps" model and step
    step, _, bs, model = variants["steps"]
    with Clock() as clk:
        for xb, yb in epoch_dataset(x, y, cfg, 2, strategy): float(step(xb, yb))
    row("epoch (as fit)", clk)

    print(f"# {a.recipe} {a.set}  host {json.dumps(host())}")
    print(f"{'part':<16}{'wall s':>9}{'CPU s':>9}{'steal s':>9}   (per 54,000 images; median of blocks)")
    out = {}
    for name, vals in rows.items():
        w, c, st = (statistics.median(v[i] for v in vals) for i in range(3))
        out[name] = {"wall_s": round(w, 1), "cpu_s": round(c, 1), "steal_s": round(st, 1), "blocks": len(vals)}
        print(f"{name:<16}{w:>9.1f}{c:>9.1f}{st:>9.1f}")
    base = out["steps"]["cpu_s"]
    for name in ("steps jit", "steps bs=512", "epoch (as fit)"):
        print(f"{name} / steps: CPU {out[name]['cpu_s'] / base:.2f}x  wall {out[name]['wall_s'] / out['steps']['wall_s']:.2f}x")
    print(json.dumps({"recipe": a.recipe, "set": json.loads(a.set), "parts": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
