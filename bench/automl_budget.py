#!/usr/bin/env python
"""The quick profile's local AutoML (stage 06_automl) as the stage runs it, then scored on the 10,000 test images.

Each seed runs in a fresh process, as the stage runs in a fresh kernel: the study opens in a temporary models store,
its first trial is the custom recipe, the search gets `search_share` of the budget, the winner is retrained on what
is left (`automl.refit_for_trial`) and exported with `automl.export_automl`; the exported model (raw pixels in,
mirror averaging and temperature built in) is scored on the test set. Printed per seed and as medians: test
accuracy, Vertex `auPrc`, the wall seconds of search + retraining + export, the process's CPU seconds over the same
span, the host's steal seconds (/proc/stat) over it, and the trials run.

The budget counts wall seconds, as in the stage. `--clock cpu` counts this process's CPU seconds divided by the
cores instead: what the same budget buys on a quiet machine, measured on a busy one.

    .venv/bin/python bench/automl_budget.py --seeds 0,1,2            # the quick profile's parameters
    .venv/bin/python bench/automl_budget.py --seeds 0 --clock cpu    # a quiet machine's 90 s, on a shared one
    .venv/bin/python bench/automl_budget.py --seeds 0 -p budget_minutes=3 -p search_share=0.5

Needs the data stage's split in the datasets store (`FMNIST_HOME`); the images come from `data.load_split`.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_host import steal_seconds  # noqa: E402  (bench/ is on the path when run as a script)

DEFAULTS = {"budget_minutes": 1.5, "search_share": 1.0, "max_trials": 20, "trial_epochs": 1, "search_train_images": 300,
            "search_val_images": 300, "widths_choices": "16,32|16,32,64|32,64,128", "batch_sizes": "64,128,256", "max_convs": 3,
            "pruner": "median", "retrain_best": False, "retrain_epochs": 0, "calibrate": True, "start_recipe": "", "tta_shift": 0}


def quick_params(overrides: list[str]) -> dict:
    "The quick profile's 06_automl parameters over the notebook-like defaults, then `-p name=value` overrides."
    from fmnist_gcp.pipeline.params import profile_params
    p = {**DEFAULTS, **{k: v for k, v in profile_params("quick")["06_automl"].items() if k in DEFAULTS}}
    for o in overrides:
        k, _, v = o.partition("=")
        if k not in p: raise SystemExit(f"-p {o}: {k!r} is not one of {', '.join(p)}")
        p[k] = v if isinstance(p[k], str) else ast.literal_eval(v)
    return p


def one_seed(seed: int, p: dict, clock_name: str) -> dict:
    "The stage's search and retraining with seed `seed`; its test figures and costs."
    from dataclasses import replace

    import numpy as np

    from fmnist_gcp import automl
    from fmnist_gcp.config import Settings, Store
    from fmnist_gcp.data import load_split, read_split
    from fmnist_gcp.evaluation import vertex_au_prc
    from fmnist_gcp.preprocessing import Augment
    from fmnist_gcp.training import fit, load_model, predict, served_views, serving_model
    settings = Settings.from_env()
    tr_idx, va_idx = read_split(settings)
    x, y = load_split("train", settings=settings)
    x_train, y_train, x_val, y_val = x[tr_idx], y[tr_idx], x[va_idx], y[va_idx]
    x_test, y_test = load_split("test", settings=settings)
    norm = {"mean": float(x_train.mean() / 255), "std": float(x_train.std() / 255)}
    augment = Augment(erase_prob=0.0)  # the quick profile's preprocessing
    xs_tr, ys_tr = x_train[:p["search_train_images"] or None], y_train[:p["search_train_images"] or None]
    xs_va, ys_va = x_val[:p["search_val_images"] or None], y_val[:p["search_val_images"] or None]
    cores = os.cpu_count() or 1
    clock = time.monotonic if clock_name == "wall" else (lambda: time.process_time() / cores)
    out_home = tempfile.mkdtemp(prefix="automl-bench-")
    out = Settings.from_env({"FMNIST_HOME": out_home})
    folder, workdir = Store("models", os.path.join(out_home, "study")), os.path.join(out_home, "work")
    space, budget_s = automl.search_space(p["widths_choices"], p["batch_sizes"], p["max_convs"]), p["budget_minutes"] * 60

    w0, c0, s0 = time.monotonic(), time.process_time(), steal_seconds()
    study = automl.open_study(folder, "bench", workdir, seed=seed, pruner=automl.make_pruner(p["pruner"], p["trial_epochs"]), log=lambda *a: None)
    start = automl.start_config(p["start_recipe"], augment)  # the first trial, and every trial's unsearched fields
    automl.start_from_recipe(study, space, start)
    trainer = automl.keras_trainer(xs_tr, ys_tr, xs_va, ys_va, norm, augment, p["trial_epochs"], seed, folder, clock=clock, base=start)
    summary = automl.run_search(study, trainer, space, budget_s * p["search_share"], p["max_trials"], log=lambda *a: None, clock=clock)
    w_search, c_search = time.monotonic() - w0, time.process_time() - c0
    best = automl.winner(study)
    cfg = replace(automl.trial_config(best.params, augment, p["trial_epochs"], seed, start), tta_shift=p["tta_shift"])
    refit = {"images": 0, "epochs": 0, "why": "retrain_best is off"}
    if p["retrain_best"] and p["search_share"] < 1:
        refit = automl.refit_for_trial(best, budget_s - summary["used_minutes"] * 60, len(x_train), len(x_val),
                                       p["retrain_epochs"] or p["trial_epochs"], views=served_views(cfg))
    if refit["images"]:
        cfg = replace(cfg, epochs=refit["epochs"])
        model, history = fit(cfg, x_train[:refit["images"]], y_train[:refit["images"]], xs_va, ys_va, norm["mean"], norm["std"], log=lambda *a: None)
    else:
        model, rec = automl.load_best(folder, norm); history = rec["history"]
    meta = automl.export_automl(out, model, cfg, history, x_val, y_val, norm, run_id=f"bench{seed}",
                                train_images=refit["images"] or len(xs_tr), train_seconds=0.0, provenance=summary,
                                calibrate=p["calibrate"])
    wall, cpu, steal = time.monotonic() - w0, time.process_time() - c0, steal_seconds() - s0

    served = load_model(os.path.join(meta["model_uri"], "model.keras"))
    proba = predict(served, x_test.astype(np.float32))
    # the same trained model served over the mirror alone (and with the same temperature): what tta_shift adds
    mirror = predict(serving_model(model, True, meta["temperature"]), x_test.astype(np.float32))
    return {"seed": seed, "clock": clock_name, "accuracy": round(float((proba.argmax(1) == y_test).mean()), 4),
            "au_prc": round(vertex_au_prc(y_test, proba), 4), "views": served_views(cfg),
            "mirror_only": {"accuracy": round(float((mirror.argmax(1) == y_test).mean()), 4), "au_prc": round(vertex_au_prc(y_test, mirror), 4)},
            "val_accuracy": round(meta["val_accuracy"], 4),
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "steal_s": round(steal, 1),
            "search_wall_s": round(w_search, 1), "search_cpu_s": round(c_search, 1), "budget_s": budget_s,
            "trials": summary["trials"], "best_trial": best.number, "best_value": round(best.value if best.value is not None else list(best.intermediate_values.values())[-1], 4),
            "best_from_recipe": best.user_attrs.get("from") == "recipe", "best_params": best.params, "residual": cfg.residual,
            "refit": {k: refit[k] for k in ("images", "epochs", "why")}, "params": meta["params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one fresh process each")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="what the budget counts (cpu: process CPU seconds / cores)")
    ap.add_argument("-p", action="append", default=[], metavar="NAME=VALUE", help="override a 06_automl parameter")
    ap.add_argument("--out", default="", help="also append each seed's JSON line to this file")
    ap.add_argument("--one-seed", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    p = quick_params(a.p)
    if a.one_seed is not None:
        print("RESULT " + json.dumps(one_seed(a.one_seed, p, a.clock)), flush=True); return
    print("parameters:", json.dumps(p), "clock:", a.clock, flush=True)
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        cmd = [sys.executable, __file__, "--one-seed", str(seed), "--clock", a.clock] + [f"-p{o}" for o in a.p]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l[7:] for l in res.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None: raise SystemExit(f"seed {seed} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(line)); print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f: f.write(json.dumps({**rows[-1], "parameters": p}) + "\n")
    med = {k: statistics.median(r[k] for r in rows) for k in ("accuracy", "au_prc", "wall_s", "cpu_s", "steal_s")}
    print(f"median of {len(rows)} seed(s): accuracy {med['accuracy']:.4f}, auPrc {med['au_prc']:.4f}, wall {med['wall_s']:.0f} s, "
          f"CPU {med['cpu_s']:.0f} s, steal {med['steal_s']:.1f} s; accuracies {[r['accuracy'] for r in rows]}")


if __name__ == "__main__":
    main()
