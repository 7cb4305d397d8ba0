#!/usr/bin/env python
"""The quick recipe's levers, one table: every `bench/train_recipe.py` measurement of the quick recipe in the dev store,
grouped by recipe (its `--set` changes without the seed), with the medians over seeds of test accuracy, Vertex's
auPrc, macro ROC AUC and training CPU seconds, beside the floor and the moonshot; and each run's test accuracy after
every epoch against the training CPU seconds spent so far (the time-to-93.9 % curve, where the run probed the test
set each epoch).

Writes `bench/results/quick_levers.json`, which the training report reads and plots.

    .venv/bin/python bench/levers.py                 # the dev store of FMNIST_HOME
    .venv/bin/python bench/levers.py --write         # and write bench/results/quick_levers.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fmnist_gcp.config import Settings
from fmnist_gcp.training import RECIPE_RESULTS

FLOOR = {"accuracy": 0.930, "au_prc": 0.979, "cpu_seconds": 720}  # issue 20: never below what the quick recipe replaced
MOONSHOT = {"accuracy": 0.939, "au_prc": 0.985, "cpu_seconds": 720}
OUT = Path(__file__).resolve().parent / "results" / "quick_levers.json"


IGNORED = {"seed", "precision", "deterministic"}  # not levers: the seed varies within a group; the others do not change results


def lever(row: dict) -> str:
    "A row's recipe as its differences from TrainConfig's defaults (augmentation included), without the seed."
    from fmnist_gcp.training import TrainConfig
    base, cfg = TrainConfig().to_dict(), row["config"]
    diff = {k: v for k, v in cfg.items() if k not in IGNORED | {"augment"} and base.get(k, v) != v}
    diff |= {f"augment.{k}": v for k, v in cfg.get("augment", {}).items() if base["augment"].get(k) != v}
    return json.dumps(diff, sort_keys=True) if diff else "TrainConfig defaults"


def curve(row: dict) -> list[tuple[float, float]] | None:
    "(training CPU seconds so far, test accuracy) after each epoch, where the run recorded both."
    h = row.get("history", [])
    if not h or not all("cpu_seconds" in e and "test_accuracy" in e for e in h): return None
    spent, out = 0.0, []
    for e in h:
        spent += e["cpu_seconds"]; out.append((round(spent, 1), e["test_accuracy"]))
    return out


def table(rows: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("recipe") != "quick" or r.get("train_images", 0) < 50_000: continue
        groups.setdefault(lever(r), []).append(r)
        for name, v in r.get("tta", {}).items():  # the same trained model scored with other test-time views
            groups.setdefault(f"{lever(r)} + TTA views: {name} ({v['views']})", []).append({**r, "test": v["test"], "history": []})
    out = []
    for name, rs in groups.items():
        rs = list({r["config"]["seed"]: r for r in rs}.values())  # one run per seed: the latest (a seed reruns identically)
        med = lambda f: statistics.median(f(r) for r in rs)
        acc, prc, cpu = med(lambda r: r["test"]["accuracy"]), med(lambda r: r["test"]["au_prc"]), med(lambda r: r["cpu_seconds"])
        out.append({"recipe": name, "seeds": sorted(r["config"]["seed"] for r in rs), "epochs": rs[0]["epochs"],
                    "accuracy": round(acc, 4), "au_prc": round(prc, 4),
                    "macro_roc_auc": round(med(lambda r: r["test"]["macro_roc_auc"]), 4),
                    "cpu_seconds": round(cpu, 1), "steal_seconds": round(med(lambda r: r["steal_seconds"]), 1),
                    "wall_seconds": round(med(lambda r: r["train_seconds"]), 1),
                    "load_average": [r.get("host", {}).get("load_average", [None])[0] for r in rs],
                    "per_seed": [{"seed": r["config"]["seed"], "accuracy": r["test"]["accuracy"], "au_prc": round(r["test"]["au_prc"], 4),
                                  "cpu_seconds": r["cpu_seconds"], "curve": curve(r)} for r in rs],
                    "floor": acc >= FLOOR["accuracy"] and prc >= FLOOR["au_prc"] and cpu <= FLOOR["cpu_seconds"],
                    "moonshot": acc >= MOONSHOT["accuracy"] and prc >= MOONSHOT["au_prc"] and cpu <= MOONSHOT["cpu_seconds"]})
    return sorted(out, key=lambda r: (-r["accuracy"], r["cpu_seconds"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help=f"write {OUT.relative_to(OUT.parents[2])}")
    a = ap.parse_args(argv)
    dev = Settings.from_env().dev
    if not dev.exists(RECIPE_RESULTS): raise SystemExit(f"no measurements in {dev.uri(RECIPE_RESULTS)}: run bench/train_recipe.py first")
    rows = table([json.loads(l) for l in dev.read_text(RECIPE_RESULTS).splitlines() if l.strip()])
    print(f"{'recipe':<110}{'seeds':>7}{'acc':>8}{'auPrc':>8}{'CPU-s':>8}{'steal':>7}  floor")
    for r in rows:
        print(f"{r['recipe']:<110}{len(r['seeds']):>7}{r['accuracy']:>8.4f}{r['au_prc']:>8.4f}{r['cpu_seconds']:>8.0f}{r['steal_seconds']:>7.1f}  "
              f"{'yes' if r['floor'] else 'no'}")
    print(f"floor: accuracy >= {FLOOR['accuracy']}, auPrc >= {FLOOR['au_prc']}, <= {FLOOR['cpu_seconds']} CPU-s (medians over seeds)")
    if a.write:
        tmp = OUT.with_suffix(".tmp")
        tmp.write_text(json.dumps({"what": __doc__.split("\n\n")[0], "floor": FLOOR, "moonshot": MOONSHOT, "rows": rows}, indent=1) + "\n")
        tmp.replace(OUT); print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
