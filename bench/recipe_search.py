#!/usr/bin/env python
"""Accuracy of many training recipes per epoch, on any Keras backend: where a recipe stands after each epoch.

Each recipe is `fmnist_gcp.training.TrainConfig` changes (plus augmentation changes), trained with the package's
own model (`build_model`), optimizer and schedule (`make_optimizer`, weight averaging included) and augmentation
(`preprocessing.epoch_batches`) through Keras' `model.fit`, so it runs on the JAX or PyTorch backend too, on a GPU
machine with no TensorFlow. After every epoch it scores the 10,000 test images (mirror-averaged, the way the
exported model predicts) and the validation split; at the end it fits the temperature on validation and records
the served model's test metrics (`evaluation.classification_metrics`: accuracy, Vertex's `au_prc`, macro ROC AUC).

What this gives is the *number of epochs* each recipe needs: accuracy after an epoch does not depend on the
hardware that computed it (up to rounding). The minutes a recipe takes on the 2-core machine are its epochs times
the seconds per epoch that `bench/train_throughput.py` measures there; `bench/time_to_target.py` joins the two,
and `bench/train_recipe.py --test-each-epoch` confirms the winners end to end on the 2-core machine.

    KERAS_BACKEND=jax python bench/recipe_search.py --out runs/search.jsonl --workers 6 --minutes 8
    .venv/bin/python bench/recipe_search.py --only quick --epochs 1 --max-train-images 2000  # smoke, TensorFlow

Workers are separate processes (one model each) pulling recipes from one list, best first; each finished
(recipe, seed) is one JSON line in --out, so a run cut short keeps what it finished.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's package, without installing it

from fmnist_gcp.evaluation import AUTOML_VISION, REFERENCES  # noqa: E402

TARGET = REFERENCES[AUTOML_VISION]["accuracy"]  # Google AutoML Vision's test accuracy, 0.939

# the profiles' recipes when the search ran (bench/results/recipe_search_h100.jsonl): every recipe is one of them
# with changes, whatever TrainConfig's defaults are today (each result line holds its whole config as well)
QUICK = {"widths": [32, 64, 128], "convs": 2, "residual": False, "epochs": 12, "batch_size": 256, "lr": 0.004,
         "warmup_frac": 0.15, "label_smoothing": 0.0, "weight_decay": 5e-4, "ema": 0.0}
QUICK_AUG = {"erase_prob": 0.0}
FULL = {**QUICK, "widths": [64, 128, 256], "epochs": 30, "batch_size": 128, "lr": 0.003, "warmup_frac": 0.1}
FULL_AUG = {"erase_prob": 0.3}


def recipes() -> list[dict]:
    "Named recipes, in the order they are tried: the two profiles first, then one lever at a time, then combinations."
    r = [{"name": "full", "set": FULL, "aug": FULL_AUG}]
    for e in (12, 8, 6):
        r.append({"name": f"quick-e{e}", "set": {**QUICK, "epochs": e}, "aug": QUICK_AUG})
    levers = {
        "residual-c3": {"residual": True, "convs": 3},
        "ema": {"ema": 0.99},
        "ls0.1": {"label_smoothing": 0.1},
        "w48": {"widths": [48, 96, 192]},
        "w64": {"widths": [64, 128, 256]},
        "bs512": {"batch_size": 512, "lr": 0.006},
        "bs128": {"batch_size": 128, "lr": 0.003},
        "wd2e-3": {"weight_decay": 2e-3},
    }
    for e in (8, 6):
        for k, v in levers.items():
            r.append({"name": f"{k}-e{e}", "set": {**QUICK, **v, "epochs": e}, "aug": QUICK_AUG})
        r.append({"name": f"erase0.25-e{e}", "set": {**QUICK, "epochs": e}, "aug": {"erase_prob": 0.25}})
    combos = {
        "w64-res-ema-ls": {"widths": [64, 128, 256], "residual": True, "convs": 3, "ema": 0.99, "label_smoothing": 0.1},
        "w64-ema-ls": {"widths": [64, 128, 256], "ema": 0.99, "label_smoothing": 0.1},
        "w48-res-ema-ls": {"widths": [48, 96, 192], "residual": True, "convs": 3, "ema": 0.99, "label_smoothing": 0.1},
        "w32-res-ema-ls": {"residual": True, "convs": 3, "ema": 0.99, "label_smoothing": 0.1},
        "w64-ema-ls-bs512": {"widths": [64, 128, 256], "ema": 0.99, "label_smoothing": 0.1, "batch_size": 512, "lr": 0.006},
    }
    for e in (6, 8, 10):
        for k, v in combos.items():
            r.append({"name": f"{k}-e{e}", "set": {**QUICK, **v, "epochs": e}, "aug": QUICK_AUG})
    full_levers = {"full-res-ema-ls": {"residual": True, "convs": 3, "ema": 0.999, "label_smoothing": 0.1},
                   "full-ema-ls": {"ema": 0.999, "label_smoothing": 0.1},
                   "full-res-ema-ls-e45": {"residual": True, "convs": 3, "ema": 0.999, "label_smoothing": 0.1, "epochs": 45}}
    for k, v in full_levers.items():
        r.append({"name": k, "set": {**FULL, **v}, "aug": FULL_AUG})
    # second pass: longer schedules, for the full profile's 60-minute budget and the cheap models' ceiling
    long = {"full-e45": {"epochs": 45}, "full-res-e45": {"epochs": 45, "residual": True, "convs": 3},
            "full-ls-e45": {"epochs": 45, "label_smoothing": 0.1},
            "full-res-ls-e45": {"epochs": 45, "residual": True, "convs": 3, "label_smoothing": 0.1},
            "full-bs256-e45": {"epochs": 45, "batch_size": 256, "lr": 0.004}}
    for k, v in long.items():
        r.append({"name": k, "set": {**FULL, **v}, "aug": FULL_AUG})
    r.append({"name": "full-erase0.5-e45", "set": {**FULL, "epochs": 45}, "aug": {"erase_prob": 0.5}})
    for k, v in {"quick-e30": {}, "residual-c3-e30": {"residual": True, "convs": 3},
                 "w48-res-ls-e30": {"widths": [48, 96, 192], "residual": True, "convs": 3, "label_smoothing": 0.1},
                 "quick-e20": {"epochs": 20}}.items():
        r.append({"name": k, "set": {**QUICK, "epochs": 30, **v}, "aug": QUICK_AUG})
    return r


def load_data(val_fraction: float = 0.1, max_train_images: int = 0):
    "The data stage's split (same seed), recomputed from the IDX files; the test set; normalisation of training."
    from fmnist_gcp.data import load_split, train_val_split
    from fmnist_gcp.statistics import normalisation
    x, y = load_split("train")
    tr, va = train_val_split(y, val_fraction)
    tr = tr[:max_train_images or None]
    x_te, y_te = load_split("test")
    return {"x_tr": x[tr], "y_tr": y[tr], "x_va": x[va], "y_va": y[va], "x_te": x_te, "y_te": y_te,
            "norm": normalisation(x[tr])}


def train_recipe(recipe: dict, seed: int, data: dict, precision: str, log=print) -> dict:
    "Train one recipe with one seed; per-epoch validation and test accuracy, final served-model test metrics."
    import math

    import keras
    import numpy as np

    from fmnist_gcp.evaluation import classification_metrics
    from fmnist_gcp.preprocessing import Augment, epoch_batches
    from fmnist_gcp.training import (TrainConfig, averaged_weights, build_model, fit_temperature, make_optimizer,
                                     serving_model, soften)
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **recipe["set"], "seed": seed, "precision": precision,
                                 "augment": {**TrainConfig().augment.__dict__, **recipe.get("aug", {})}})
    keras.utils.set_random_seed(seed)
    x_tr, y_tr = data["x_tr"], data["y_tr"]
    model = build_model(cfg, data["norm"]["mean"], data["norm"]["std"])
    steps = math.ceil(len(x_tr) / cfg.batch_size) * cfg.epochs
    opt = make_optimizer(cfg, steps)
    model.compile(optimizer=opt, loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                  jit_compile=True)
    sm = serving_model(model, cfg.tta_flip)  # shares the model's weights: built (and compiled) once
    def proba(m, x): return np.asarray(m.predict(x.astype(np.float32), batch_size=2000, verbose=0))
    history, t_start = [], time.perf_counter()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        xs, ys = zip(*epoch_batches(x_tr, y_tr, cfg.batch_size, cfg.seed, epoch, cfg.augment))
        xe, ye = np.concatenate(xs).astype(np.float32), keras.utils.to_categorical(np.concatenate(ys), 10)
        fit_h = model.fit(xe, ye, batch_size=cfg.batch_size, epochs=1, shuffle=False, verbose=0)
        s = time.perf_counter() - t0
        with averaged_weights(model, opt):
            va, te = proba(sm, data["x_va"]), proba(sm, data["x_te"])
        h = {"epoch": epoch + 1, "loss": float(fit_h.history["loss"][-1]), "seconds": round(s, 2),
             "val_accuracy": float((va.argmax(1) == data["y_va"]).mean()),
             "test_accuracy": float((te.argmax(1) == data["y_te"]).mean())}
        history.append(h)
        log(f"{recipe['name']} s{seed} epoch {h['epoch']}/{cfg.epochs} val {h['val_accuracy']:.4f} "
            f"test {h['test_accuracy']:.4f} {s:.1f} s")
    opt.finalize_variable_values(model.trainable_variables)
    p_va = proba(sm, data["x_va"])
    t = fit_temperature(p_va, data["y_va"])
    test = classification_metrics(data["y_te"], soften(proba(sm, data["x_te"]), t))
    reached = next((h["epoch"] for h in history if h["test_accuracy"] >= TARGET), None)
    return {"name": recipe["name"], "seed": seed, "set": recipe["set"], "aug": recipe.get("aug", {}),
            "config": cfg.to_dict(), "params": int(model.count_params()), "epochs": cfg.epochs,
            "train_images": len(x_tr), "wall_seconds": round(time.perf_counter() - t_start, 1), "temperature": t,
            "test": test, "epochs_to_target": reached, "target": TARGET, "history": history,
            "backend": keras.backend.backend(), "device": _device()}


def _device() -> str:
    import keras
    if keras.backend.backend() == "jax":
        import jax
        return str(jax.devices()[0].device_kind)
    return "cpu" if not os.environ.get("CUDA_VISIBLE_DEVICES") else "gpu"


def worker(wid: int, jobs, out: str, args: dict, deadline: float) -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    data = load_data(max_train_images=args["max_train_images"])
    while time.time() < deadline:
        try: recipe, seed = jobs.get_nowait()
        except Exception: return
        try:
            row = train_recipe(recipe, seed, data, args["precision"], log=lambda m: print(f"[w{wid}] {m}", flush=True))
        except Exception as e:  # one bad recipe must not end the search: record it and go on
            row = {"name": recipe["name"], "seed": seed, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(f"[w{wid}] {recipe['name']} s{seed} FAILED: {row['error']}", flush=True)
        with open(out, "a") as f: f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/recipe_search.jsonl", help="JSON lines, appended")
    ap.add_argument("--workers", type=int, default=1, help="processes training at once")
    ap.add_argument("--minutes", type=float, default=60, help="start no recipe after this many minutes")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per recipe (all recipes' first seed come first)")
    ap.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    ap.add_argument("--epochs", type=int, help="override every recipe's epochs (smoke runs)")
    ap.add_argument("--max-train-images", type=int, default=0)
    ap.add_argument("--precision", default="mixed_bfloat16", choices=("float32", "mixed_bfloat16"))
    ap.add_argument("--list", action="store_true", help="print the recipes and stop")
    a = ap.parse_args(argv)
    rs = recipes()
    if a.only:
        names = a.only.split(",")
        unknown = set(names) - {r["name"] for r in rs}
        if unknown: raise SystemExit(f"--only: no recipe named {', '.join(sorted(unknown))} (see --list)")
        rs = [r for r in rs if r["name"] in names]
    if a.epochs: rs = [{**r, "set": {**r["set"], "epochs": a.epochs}} for r in rs]
    if a.list:
        for r in rs: print(r["name"], json.dumps(r["set"]), json.dumps(r.get("aug", {})))
        return
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    jobs = ctx.Queue()
    for seed in range(a.seeds):
        for r in rs: jobs.put((r, seed))
    deadline = time.time() + a.minutes * 60
    args = {"max_train_images": a.max_train_images, "precision": a.precision}
    if a.workers == 1: worker(0, jobs, a.out, args, deadline); return
    procs = [ctx.Process(target=worker, args=(i, jobs, a.out, args, deadline)) for i in range(a.workers)]
    for p in procs: p.start()
    for p in procs: p.join()


if __name__ == "__main__":
    main()
