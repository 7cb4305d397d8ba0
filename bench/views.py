#!/usr/bin/env python
"""A registered model's network scored under each set of test-time views, on the 10,000 test images.

The served model of a version averages its network over some views (the mirror; 1-pixel shifts) and softens the
result by a temperature fitted on validation. This takes the trained network out of that wrapper and scores it
under every view set of `train_recipe.TTA_VIEWS` (none, mirror, mirror x 1-px cross = 10 views, mirror x 1-px square
= 18 views), each with its own temperature fitted on the data stage's validation split, beside the served model as
the registry holds it. Printed: accuracy, Vertex `auPrc` and macro ROC AUC per view set, and the CPU seconds (and the
host's steal) each scoring took. It answers "what did the views add to this model", for a model trained elsewhere
(the full profile's) without training it again.

    FMNIST_HOME=<a home after fmnist run> .venv/bin/python bench/views.py                  # fmnist-cnn@default
    FMNIST_HOME=<home> .venv/bin/python bench/views.py --model fmnist-cnn@3 --out bench/results/views.jsonl
"""
from __future__ import annotations

import argparse
import json
import time

from bench_host import host, steal_seconds  # run as `python bench/views.py`: bench/ is on the path
from train_recipe import data_split, tta_metrics


def main(argv: list[str] | None = None) -> dict:
    from fmnist_gcp.config import DEFAULT_MODEL, Settings
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=f"{DEFAULT_MODEL}@default", help="NAME@VERSION or NAME@default (the registry's)")
    ap.add_argument("--out", help="also append the JSON line to this file")
    a = ap.parse_args(argv)
    from fmnist_gcp.data import load_split
    from fmnist_gcp.embeddings import _network
    from fmnist_gcp.evaluation import classification_metrics
    from fmnist_gcp.serving import model_source
    from fmnist_gcp.training import load_model, predict
    uri, name, version = model_source(a.model)
    served = load_model(uri)
    network = _network(served)
    _, _, x_va, y_va = data_split(Settings.from_env(), max_train_images=1)
    x_te, y_te = load_split("test")
    t, c, s = time.perf_counter(), time.process_time(), steal_seconds()
    as_served = classification_metrics(y_te, predict(served, x_te))
    print(f"{name} v{version} as served ({'the network alone' if network is served else served.name}): test accuracy "
          f"{as_served['accuracy']:.4f}, auPrc {as_served['au_prc']:.4f}, {time.process_time() - c:.0f} CPU-s", flush=True)
    views = tta_metrics(network, x_va, y_va, x_te, y_te)
    row = {"model": name, "version": version, "host": host(), "as_served": as_served,
           "views": {k: {"views": v["views"], "temperature": v["temperature"],
                         **{m: v["test"][m] for m in ("accuracy", "au_prc", "macro_roc_auc")},
                         "cpu_seconds_val_and_test": v["cpu_seconds_val_and_test"], "seconds": v["seconds"]}
                     for k, v in views.items()},
           "wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(time.process_time() - c, 1),
           "steal_s": round(steal_seconds() - s, 1)}
    print(f"{'views':<22}{'n':>4}{'accuracy':>10}{'auPrc':>9}{'ROC AUC':>9}{'CPU-s':>8}")
    for k, v in row["views"].items():
        print(f"{k:<22}{v['views']:>4}{v['accuracy']:>10.4f}{v['au_prc']:>9.4f}{v['macro_roc_auc']:>9.4f}{v['cpu_seconds_val_and_test']:>8.1f}")
    print(f"{row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} CPU-s, host steal {row['steal_s']:.1f} s")
    if a.out:
        with open(a.out, "a") as f: f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
