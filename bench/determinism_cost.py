#!/usr/bin/env python
"""What deterministic training costs on this machine, for the quick profile's recipe.

Trains the recipe `fmnist run --profile quick` trains (`07_training` parameters from `training.recipe_params`, the
augmentation of the profile's `04_preprocessing`), shortened to a fixed amount of work: EPOCHS epochs over the
first IMAGES training images (validation on the next 2,000), once with `deterministic=False` and once with
`deterministic=True` per repeat, alternating, each in a fresh process (TensorFlow's op determinism cannot be
switched off again in a process). It prints the median training seconds of each setting and their ratio, the
ratio within each repeat (the two trainings ran back to back, so the load of a shared machine changes less between
them) and its median, says
whether the deterministic repeats gave bitwise-identical losses and accuracies, and writes everything to
`bench/results/determinism_cost.json`.

    .venv/bin/python bench/determinism_cost.py                     # 3 repeats of 2 epochs on 10,000 images
    .venv/bin/python bench/determinism_cost.py --repeats 1 --images 2000 --epochs 1   # a quick look

Wall times depend on what else runs on the machine; the JSON records the CPU, the core count and the load.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from bench_host import host  # run as `python bench/determinism_cost.py`: bench/ is on the path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
OUT = Path(__file__).resolve().parent / "results" / "determinism_cost.json"


def quick_recipe(deterministic: bool, epochs: int):
    "The TrainConfig of the quick profile, with `epochs` and `deterministic` set."
    from fmnist_gcp.pipeline.params import plan_run
    from fmnist_gcp.preprocessing import Augment
    from fmnist_gcp.training import TrainConfig, resolve_precision
    params = {s["stage"]: s["params"] for s in plan_run("quick", ["04_preprocessing", "07_training"], run_id="bench")}
    aug = Augment(**{f.name: params["04_preprocessing"][f.name] for f in fields(Augment)})
    cfg = TrainConfig.from_params(params["07_training"], augment=aug)
    return replace(cfg, epochs=epochs, deterministic=deterministic, precision=resolve_precision(cfg.precision))


def one(deterministic: bool, images: int, epochs: int) -> dict:
    "Train once in this process; the seconds `fit` took and what it learned."
    from fmnist_gcp.data import load_split
    from fmnist_gcp.statistics import normalisation
    from fmnist_gcp.training import fit
    x, y = load_split("train")
    x_tr, y_tr, x_va, y_va = x[:images], y[:images], x[images:images + 2000], y[images:images + 2000]
    norm, cfg = normalisation(x_tr), quick_recipe(deterministic, epochs)
    t0, c0 = time.perf_counter(), time.process_time()
    _, history = fit(cfg, x_tr, y_tr, x_va, y_va, norm["mean"], norm["std"], log=lambda *a, **k: None)
    return {"deterministic": deterministic, "fit_seconds": round(time.perf_counter() - t0, 3),
            "cpu_seconds": round(time.process_time() - c0, 3), "epoch_seconds": [h["seconds"] for h in history],
            "learned": [{k: h[k] for k in ("loss", "val_loss", "val_accuracy")} for h in history],
            "precision": cfg.precision, "widths": list(cfg.widths), "batch_size": cfg.batch_size}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000, help="training images (the first N of the training file)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the quick recipe (its schedule shortened to them)")
    ap.add_argument("--repeats", type=int, default=3, help="trainings per setting")
    ap.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # the child process: one training, JSON out
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--summarise", action="store_true", help="recompute the summary from the trainings recorded in --out")
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one == "on", a.images, a.epochs))); return {}
    if a.summarise:  # recompute the summary of the trainings already in the JSON
        old = json.loads(a.out.read_text())
        return write({**old, **summary(old["runs"], old["what"])}, a.out)
    runs, load0 = [], host()
    for r in range(a.repeats):
        for det in (False, True):
            cmd = [sys.executable, __file__, "--one", "on" if det else "off", "--images", str(a.images), "--epochs", str(a.epochs)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs.append(json.loads(out))
            print(f"repeat {r + 1} deterministic={det!s:<5} fit {runs[-1]['fit_seconds']:6.1f} s  epochs {runs[-1]['epoch_seconds']}", flush=True)
    res = summary(runs, f"quick recipe, {a.epochs} epochs on {a.images} training images, {a.repeats} repeats per setting")
    res = {**res, "host": {**load0, "load_average_after": host()["load_average"]}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": runs}
    return write(res, a.out)


def summary(runs: list[dict], what: str) -> dict:
    "Medians of each setting, their ratio, and the median of the ratios within each repeat (the two trainings ran back to back,\n    so a change in the machine's load between repeats does not enter it)."
    med = {det: statistics.median(x["fit_seconds"] for x in runs if x["deterministic"] == det) for det in (False, True)}
    last = {det: statistics.median(x["epoch_seconds"][-1] for x in runs if x["deterministic"] == det) for det in (False, True)}
    same = lambda det: len({json.dumps(x["learned"]) for x in runs if x["deterministic"] == det}) == 1
    pairs = [round(d["fit_seconds"] / o["fit_seconds"], 3) for o, d in zip(runs[::2], runs[1::2])]
    return {"what": what, "median_fit_seconds": {"default": med[False], "deterministic": med[True]}, "ratio": round(med[True] / med[False], 3),
            "paired_ratios": pairs, "median_paired_ratio": statistics.median(pairs),
            "median_last_epoch_seconds": {"default": last[False], "deterministic": last[True]}, "last_epoch_ratio": round(last[True] / last[False], 3),
            "bitwise_identical_repeats": {"default": same(False), "deterministic": same(True)}}


def write(res: dict, out: Path) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"median fit: {res['median_fit_seconds']['default']:.1f} s default, {res['median_fit_seconds']['deterministic']:.1f} s "
          f"deterministic: ratio {res['ratio']:.3f} (last epoch alone: {res['last_epoch_ratio']:.3f}); within each repeat: "
          f"{res['paired_ratios']}, median {res['median_paired_ratio']:.3f}")
    ident = res["bitwise_identical_repeats"]
    print(f"repeats bitwise identical: default {ident['default']}, deterministic {ident['deterministic']}\nwrote {out}")
    return res


if __name__ == "__main__":
    main()
