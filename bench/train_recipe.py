#!/usr/bin/env python
"""Measure a training recipe with the code that ships, and append the result to the dev store.

A recipe is what a pipeline profile trains: the `07_training` parameters of `fmnist run --profile <recipe>`
(built with `fmnist_gcp.training.recipe_params`: quick = the `TrainConfig` defaults, full = its differences) and
the augmentation of that profile's `04_preprocessing` stage, plus `--set` changes of `TrainConfig` fields.

The script trains with `fmnist_gcp.training.fit` (the package's model, augmentation and schedule) on the data
stage's training split (54,000 images), fits the temperature on the validation split with `calibration`, scores
the 10,000 test images once with the served model (`serving_model`: mirror averaging and temperature built in)
and `evaluation.classification_metrics` (Vertex's `au_prc` among them), prints a comparison with earlier
measurements and the published references, and appends one JSON line to `bench/train_recipe.jsonl` in the dev
store (`training.RECIPE_RESULTS`), where the training report reads it.

    .venv/bin/python bench/train_recipe.py --recipe quick
    .venv/bin/python bench/train_recipe.py --recipe full
    .venv/bin/python bench/train_recipe.py --recipe quick --set '{"batch_size": 128, "lr": 0.003}'
    .venv/bin/python bench/train_recipe.py --set '{"augment": {"erase_prob": 0.3}}'
    .venv/bin/python bench/train_recipe.py --epochs 1 --max-train-images 2000 --set '{"widths": [8, 16]}'  # smoke run

Wall times depend on the machine and on what else runs on it; the line records the CPU, the core count and the
CPU seconds of this process next to the wall seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import fields, replace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
from bench_host import host, steal_seconds  # run as `python bench/train_recipe.py`: bench/ is on the path

from fmnist_gcp.config import Settings
from fmnist_gcp.data import load_split, read_split
from fmnist_gcp.evaluation import AUTOML_VISION, REFERENCES, classification_metrics, compare
from fmnist_gcp.pipeline.params import plan_run
from fmnist_gcp.preprocessing import Augment
from fmnist_gcp.statistics import normalisation
from fmnist_gcp.training import (RECIPE_RESULTS, TrainConfig, calibration, fit, fit_temperature, predict,
                                 resolve_precision, serving_model, soften)

RECIPES = ("quick", "full")  # the pipeline profiles that train on all the data


def profile_recipe(profile: str) -> TrainConfig:
    "The TrainConfig, augmentation included, that `fmnist run --profile <profile>` trains."
    params = {s["stage"]: s["params"] for s in plan_run(profile, ["04_preprocessing", "07_training"], run_id="bench")}
    aug = Augment(**{f.name: params["04_preprocessing"][f.name] for f in fields(Augment)})
    return TrainConfig.from_params(params["07_training"], augment=aug)


def with_changes(cfg: TrainConfig, changes: dict) -> TrainConfig:
    "`cfg` with `changes` of TrainConfig fields; `augment` may change single augmentation fields."
    unknown = set(changes) - {f.name for f in fields(TrainConfig)}
    if unknown: raise SystemExit(f"--set: {', '.join(sorted(unknown))} is not a TrainConfig field")
    d = cfg.to_dict()
    return TrainConfig.from_dict({**d, **changes, "augment": {**d["augment"], **changes.get("augment", {})}})


def data_split(settings: Settings, max_train_images: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    "Training (the first `max_train_images`, 0 for all) and validation images and labels of the data stage's split."
    x, y = load_split("train", settings=settings)
    tr, va = read_split(settings)  # what the data stage wrote to the datasets store
    tr = tr[:max_train_images or None]
    return x[tr], y[tr], x[va], y[va]


TARGET = REFERENCES[AUTOML_VISION]["accuracy"]  # Google AutoML Vision's test accuracy, 0.939


def shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    "Images `x` (n, 28, 28) moved by (dy, dx) pixels, the uncovered border zero."
    out, h, w = np.zeros_like(x), x.shape[1], x.shape[2]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = x[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


TTA_VIEWS = {  # test-time augmentation variants scored beside the served model: (mirror?, shifts)
    "none": (False, [(0, 0)]), "mirror": (True, [(0, 0)]),
    "mirror x 1px cross": (True, [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]),
    "mirror x 1px square": (True, [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]),
}


def tta_metrics(model, x_va, y_va, x_te, y_te) -> dict:
    "Test metrics of each TTA_VIEWS variant, its temperature fitted on validation (probabilities averaged over views)."
    def probs(x, mirror, shifts):
        views = [shifted(v, dy, dx) for v in ([x, x[:, :, ::-1]] if mirror else [x]) for dy, dx in shifts]
        return np.mean([predict(model, v) for v in views], axis=0)
    out = {}
    for name, (mirror, shifts) in TTA_VIEWS.items():
        t, c = time.perf_counter(), time.process_time()
        p_va, p_te = probs(x_va, mirror, shifts), probs(x_te, mirror, shifts)
        temp = fit_temperature(p_va, y_va)
        out[name] = {"views": len(shifts) * (2 if mirror else 1), "temperature": temp,
                     "test": classification_metrics(y_te, soften(p_te, temp)),
                     "cpu_seconds_val_and_test": round(time.process_time() - c, 1), "seconds": round(time.perf_counter() - t, 1)}
        print(f"TTA {name}: {out[name]['views']} views, test accuracy {out[name]['test']['accuracy']:.4f}, "
              f"auPrc {out[name]['test']['au_prc']:.4f}", flush=True)
    return out


def measure(cfg: TrainConfig, settings: Settings, max_train_images: int = 0, test_each_epoch: bool = False,
            tta: bool = False) -> dict:
    "Train `cfg`, fit the temperature on validation, score the test set once (and after every epoch if asked)."
    x_tr, y_tr, x_va, y_va = data_split(settings, max_train_images)
    x_te, y_te = load_split("test", settings=settings)
    norm = normalisation(x_tr)
    probe_s, probe_cpu = [], []
    def probe(model):  # test accuracy of the served views (mirror, shifts) after this epoch; its time is not training time
        t, c = time.perf_counter(), time.process_time()
        acc = float((predict(serving_model(model, cfg.tta_flip, tta_shift=cfg.tta_shift), x_te).argmax(1) == y_te).mean())
        probe_s.append(time.perf_counter() - t); probe_cpu.append(time.process_time() - c)
        return {"test_accuracy": acc}
    t0, c0, s0 = time.perf_counter(), time.process_time(), steal_seconds()
    model, history = fit(cfg, x_tr, y_tr, x_va, y_va, norm["mean"], norm["std"], probe=probe if test_each_epoch else None)
    train_seconds, cpu_seconds = time.perf_counter() - t0 - sum(probe_s), time.process_time() - c0 - sum(probe_cpu)
    steal = steal_seconds() - s0  # CPU time the host took back meanwhile (all cores): read wall times beside it
    elapsed = np.cumsum([h["seconds"] for h in history])
    cpu_by_epoch = np.cumsum([h["cpu_seconds"] for h in history]) if all("cpu_seconds" in h for h in history) else None
    reached = next((i for i, h in enumerate(history) if h.get("test_accuracy", 0) >= TARGET), None)
    temperature, p_va = calibration(model, cfg, x_va, y_va)
    p_te = predict(serving_model(model, cfg.tta_flip, temperature, cfg.tta_shift), x_te)
    return {"config": cfg.to_dict(), "params": int(model.count_params()), "epochs": len(history),
            "train_images": len(x_tr), "train_seconds": round(train_seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
            "steal_seconds": round(steal, 1),
            "s_per_epoch": round(statistics.median(h["seconds"] for h in history), 1), "temperature": temperature,
            "val_uncalibrated": classification_metrics(y_va, p_va), "val": classification_metrics(y_va, soften(p_va, temperature)),
            "test": classification_metrics(y_te, p_te), "history": history,
            **({"tta": tta_metrics(model, x_va, y_va, x_te, y_te)} if tta else {}),
            **({"target": TARGET, "epochs_to_target": None if reached is None else reached + 1,
                "minutes_to_target": None if reached is None else round(float(elapsed[reached]) / 60, 2)} if test_each_epoch else {})}


def label(r: dict) -> str:
    return f"{r['recipe']}{' ' + json.dumps(r['overrides']) if r['overrides'] else ''} ({r['created'][:16]})"


def comparison(row: dict, earlier: list[dict], last: int = 8) -> pd.DataFrame:
    "Test metrics and training minutes of this run, the `last` earlier runs and the published references."
    runs = {f"this run: {label(row)}": row, **{label(r): r for r in earlier[-last:]}}
    table = compare({k: r["test"] for k, r in runs.items()}, REFERENCES)
    table["train min"] = [round(r["train_seconds"] / 60, 1) for r in runs.values()] + [np.nan] * len(REFERENCES)
    table[f"min to {TARGET:.1%}"] = [r.get("minutes_to_target") for r in runs.values()] + [np.nan] * len(REFERENCES)
    return table


def median_of_seeds(rows: list[dict]) -> dict:
    "Medians over the seeds of one recipe: test accuracy, auPrc, macro ROC AUC, training minutes, minutes to the target."
    med = lambda xs: float(np.median(xs)) if xs else None
    reached = [r["minutes_to_target"] for r in rows if r.get("minutes_to_target") is not None]
    return {"seeds": [r["config"]["seed"] for r in rows],
            **{k: med([r["test"][k] for r in rows]) for k in ("accuracy", "au_prc", "macro_roc_auc")},
            "train_minutes": med([r["train_seconds"] / 60 for r in rows]),
            "minutes_to_target": med(reached) if len(reached) > len(rows) // 2 else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=RECIPES, default="quick", help="the pipeline profile whose recipe to train")
    ap.add_argument("--set", default="{}", help='JSON object of TrainConfig fields to change, e.g. \'{"lr": 0.003}\'')
    ap.add_argument("--epochs", type=int, help="shorthand for --set '{\"epochs\": N}'")
    ap.add_argument("--max-train-images", type=int, default=0, help="train on the first N images of the split (0: all)")
    ap.add_argument("--test-each-epoch", action="store_true",
                    help=f"score the test set after every epoch (benchmark only) and report the minutes to {TARGET:.1%}")
    ap.add_argument("--tta", action="store_true",
                    help="also score test-time augmentation variants (none, mirror, mirror x 1-pixel shifts) after training")
    ap.add_argument("--seeds", default="", help="comma-separated seeds, trained one after another; prints their medians")
    a = ap.parse_args(argv)
    changes = json.loads(a.set) | ({"epochs": a.epochs} if a.epochs else {})
    cfg = with_changes(profile_recipe(a.recipe), changes)
    cfg = replace(cfg, precision=resolve_precision(cfg.precision))
    print(f"{a.recipe} recipe{' with ' + json.dumps(changes) if changes else ''}: {cfg}", flush=True)
    settings = Settings.from_env()
    dev, rows = settings.dev, []
    for seed in [int(s) for s in a.seeds.split(",")] if a.seeds else [cfg.seed]:
        c = replace(cfg, seed=seed)
        row = {"recipe": a.recipe, "overrides": changes, **measure(c, settings, a.max_train_images, a.test_each_epoch, a.tta),
               "host": host(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        earlier = [json.loads(l) for l in dev.read_text(RECIPE_RESULTS).splitlines() if l.strip()] if dev.exists(RECIPE_RESULTS) else []
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(comparison(row, earlier).round(4).to_string())
        print(f"training: {row['train_seconds']} s wall, {row['cpu_seconds']} CPU-seconds of this process, "
              f"{row['steal_seconds']} s stolen by the host (all cores) meanwhile; {row['epochs']} epochs", flush=True)
        dev.write_text(RECIPE_RESULTS, "".join(json.dumps(r) + "\n" for r in [*earlier, row]))
        print(f"appended to {dev.uri(RECIPE_RESULTS)}", flush=True)
        rows.append(row)
    if len(rows) > 1: print(f"medians of {len(rows)} seeds: {json.dumps(median_of_seeds(rows))}")
    return rows


if __name__ == "__main__":
    main()
