#!/usr/bin/env python
"""Training minutes to Google AutoML Vision's 93.9 % on this machine, for every recipe of the recipe search.

Joins two measurements:
  1. epochs: `bench/recipe_search.py`'s per-epoch test accuracy of each recipe (medians over its seeds), which does
     not depend on the machine that trained it (the search ran on a GPU: `bench/results/recipe_search_h100.jsonl`);
  2. seconds per epoch *here*: the package's real training loop (`training.fit`, bf16 where the CPU has it, the
     profile's batch size) timed on this machine for each architecture in the search, median of the timed epochs,
     scaled to the 54,000 training images.
and prints, for each recipe: parameters, epochs, test accuracy, `auPrc`, macro ROC AUC, training minutes here and
the minutes until test accuracy first reached 93.9 %. It also times the float32 path (what `precision=auto` picks
on a CPU without native bf16) for the profiles' recipes: the factor by which their budgets grow on such a machine.
The table goes to `bench/results/time_to_target.json`, which the training report plots.

    .venv/bin/python bench/time_to_target.py                    # every architecture of the search (about 20 minutes)
    .venv/bin/python bench/time_to_target.py --only quick-e8,full # some recipes
    .venv/bin/python bench/time_to_target.py --images 1024 --epochs 2  # smoke

`bench/train_recipe.py --test-each-epoch` trains one recipe end to end here and gives the same figures measured
directly, without the join.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_host import host, steady_images_per_s  # run as `python bench/time_to_target.py`: bench/ is on the path

TRAIN_IMAGES = 54_000  # the data stage's training split
from fmnist_gcp.evaluation import AUTOML_VISION, REFERENCES  # noqa: E402

TARGET = REFERENCES[AUTOML_VISION]["accuracy"]  # Google AutoML Vision's test accuracy, 0.939
ARCH = ("widths", "convs", "residual", "batch_size")  # what the seconds per epoch depend on (besides precision)


def summarise(rows: list[dict]) -> dict[str, dict]:
    "Recipe name -> medians over its seeds: test metrics, epochs to the target (None unless most seeds reached it), curve."
    by = {}
    for r in rows:
        if "error" not in r: by.setdefault(r["name"], []).append(r)
    out = {}
    for name, rs in by.items():
        reached = sorted(r["epochs_to_target"] for r in rs if r["epochs_to_target"])
        curve = [statistics.median(h) for h in zip(*[[e["test_accuracy"] for e in r["history"]] for r in rs])]
        out[name] = {"config": rs[0]["config"], "params": rs[0]["params"], "epochs": rs[0]["epochs"], "seeds": len(rs),
                     **{k: statistics.median(r["test"][k] for r in rs) for k in ("accuracy", "au_prc", "macro_roc_auc")},
                     "accuracy_min": min(r["test"]["accuracy"] for r in rs), "accuracy_max": max(r["test"]["accuracy"] for r in rs),
                     "epochs_to_target": reached[len(rs) // 2] if len(reached) > len(rs) // 2 else None,
                     "test_accuracy_by_epoch": curve, "device": rs[0].get("device")}
    return out


def arch_key(cfg: dict) -> str:
    return json.dumps({k: cfg[k] for k in ARCH}, sort_keys=True)


def seconds_per_epoch(cfg: dict, precision: str, images: int, epochs: int, deterministic: bool = False) -> float:
    "Seconds of one epoch of `training.fit` here at its steady speed (`steady_images_per_s`), scaled to TRAIN_IMAGES."
    from fmnist_gcp.training import TrainConfig
    c = TrainConfig.from_dict({**cfg, "epochs": epochs, "precision": precision, "ema": 0.0, "deterministic": deterministic})
    return TRAIN_IMAGES / steady_images_per_s(c, images)


def table(summary: dict, spe: dict) -> list[dict]:
    rows = []
    for name, s in summary.items():
        sec = spe[arch_key(s["config"])]
        rows.append({"recipe": name, "params": s["params"], "epochs": s["epochs"], "seeds": s["seeds"],
                     "test_accuracy": s["accuracy"], "au_prc": s["au_prc"], "macro_roc_auc": s["macro_roc_auc"],
                     "s_per_epoch": round(sec, 1), "train_minutes": round(s["epochs"] * sec / 60, 1),
                     "epochs_to_target": s["epochs_to_target"],
                     "minutes_to_target": round(s["epochs_to_target"] * sec / 60, 1) if s["epochs_to_target"] else None,
                     "minutes_by_epoch": [round((i + 1) * sec / 60, 2) for i in range(s["epochs"])],
                     "test_accuracy_by_epoch": s["test_accuracy_by_epoch"], "config": s["config"]})
    return sorted(rows, key=lambda r: (r["minutes_to_target"] is None, r["minutes_to_target"] or 0, -r["test_accuracy"]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--search", default=str(ROOT / "bench/results/recipe_search_h100.jsonl"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/time_to_target.json"))
    ap.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    ap.add_argument("--images", type=int, default=12_800, help="images per timed epoch")
    ap.add_argument("--epochs", type=int, default=4, help="epochs timed per architecture (the first is not counted)")
    ap.add_argument("--float32", default="residual-c3-e6,w48-res-ls-e30", help="recipes whose float32 path is timed too")
    ap.add_argument("--deterministic", default="residual-c3-e6", help="recipes timed with TensorFlow op determinism too "
                    "(last: it cannot be switched off in a process)")
    a = ap.parse_args(argv)
    from fmnist_gcp.training import resolve_precision
    rows = [json.loads(l) for l in open(a.search) if l.strip()]
    summary = summarise(rows)
    if a.only: summary = {k: v for k, v in summary.items() if k in a.only.split(",")}
    native = resolve_precision("auto")
    spe, spe32 = {}, {}
    for name, s in summary.items():
        k = arch_key(s["config"])
        if k not in spe:
            t = time.perf_counter()
            spe[k] = seconds_per_epoch(s["config"], native, a.images, a.epochs)
            print(f"{name:<22} {k}: {spe[k]:.1f} s per epoch ({native}; measured in {time.perf_counter() - t:.0f} s)", flush=True)
        if name in a.float32.split(",") and k not in spe32:
            spe32[k] = seconds_per_epoch(s["config"], "float32", a.images, a.epochs)
            print(f"{name:<22} float32: {spe32[k]:.1f} s per epoch, {spe32[k] / spe[k]:.2f}x the {native} path", flush=True)
    det = {}
    for name in a.deterministic.split(",") if a.deterministic else []:
        if name not in summary: continue
        k = arch_key(summary[name]["config"])
        det[name] = round(seconds_per_epoch(summary[name]["config"], native, a.images, a.epochs, deterministic=True) / spe[k], 2)
        print(f"{name:<22} deterministic: {det[name]:.2f}x the seconds per epoch", flush=True)
    t = table(summary, spe)
    print(f"\nTraining minutes here ({native}, {TRAIN_IMAGES:,} images per epoch); epochs and accuracy from "
          f"{os.path.relpath(a.search, ROOT)} (medians over seeds); target {TARGET:.1%}")
    print(f"{'recipe':<22}{'params':>9}{'epochs':>7}{'seeds':>6}{'test acc':>9}{'auPrc':>8}{'ROC AUC':>8}{'min':>7}{'min to 93.9':>12}")
    for r in t:
        mt = f"{r['minutes_to_target']:.1f}" if r["minutes_to_target"] is not None else "-"
        print(f"{r['recipe']:<22}{r['params']:>9,}{r['epochs']:>7}{r['seeds']:>6}{r['test_accuracy']:>9.4f}{r['au_prc']:>8.4f}"
              f"{r['macro_roc_auc']:>8.4f}{r['train_minutes']:>7.1f}{mt:>12}")
    f32 = {name: round(spe32[arch_key(s["config"])] / spe[arch_key(s["config"])], 2)
           for name, s in summary.items() if name in a.float32.split(",")}
    if f32: print("\nfloat32 path / " + native + " path, seconds per epoch: " + ", ".join(f"{k} {v:.2f}x" for k, v in f32.items()))
    result = {"what": __doc__.splitlines()[0], "target": TARGET, "precision": native, "search": os.path.relpath(a.search, ROOT),
              "float32_factor": f32, "deterministic_factor": det,
              "timed": {"images_per_epoch": a.images, "epochs": a.epochs, "not_counted": "the first epoch"}, "rows": t, "host": host(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f: json.dump(result, f, indent=1)
    os.replace(tmp, a.out)
    print(f"wrote {os.path.relpath(a.out, ROOT)}")
    return result


if __name__ == "__main__":
    main()
