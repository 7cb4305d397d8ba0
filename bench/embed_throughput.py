#!/usr/bin/env python
"""Images/s of the embeddings stage's forward pass: the traced `embeddings.embedding_function` (embedding and served
probabilities from one graph) against the eager two-model way it replaced, interleaved in one run.

  rounds alternate the two on the same images; each round's new/old speed ratio, the median over rounds; then one
  timed `embed` call over all of `--images` with the new function (the stage's embedding call, e.g. 10,000 test images).
Beside every wall time: this process's CPU seconds and the host's steal seconds (/proc/stat).

    .venv/bin/python bench/embed_throughput.py                        # the registry's champion of the custom model
    .venv/bin/python bench/embed_throughput.py --model fmnist-cnn@3 --images 10000 --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import time


def main():
    from bench_host import steal_seconds  # run as `python bench/embed_throughput.py`: bench/ is on the path
    from fmnist_gcp.config import DEFAULT_MODEL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=f"{DEFAULT_MODEL}@champion")
    ap.add_argument("--images", type=int, default=10_000, help="test images of the final timed embed call")
    ap.add_argument("--per-round", type=int, default=1000, help="images each way per interleaved round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=500, help="images per forward pass (the stage's embed_batch)")
    a = ap.parse_args()
    import numpy as np
    from fmnist_gcp.data import load_split
    from fmnist_gcp.embeddings import embed, embedding_function, embedding_model
    from fmnist_gcp.serving import model_source
    from fmnist_gcp.training import load_model
    uri, name, version = model_source(a.model)
    served = load_model(uri)
    x, _ = load_split("test", limit=max(a.images, a.per_round))
    eager = embedding_model(served)
    ways = {"old (eager, two models)": lambda b: (np.asarray(eager(b, training=False)), np.asarray(served(b, training=False))),
            "new (one traced graph)": embedding_function(served)}
    for f in ways.values(): embed(f, x[:a.batch], a.batch, progress=False)  # warm-up (traces)
    speed, meters = {k: [] for k in ways}, {k: [0.0, 0.0, 0.0] for k in ways}
    for _ in range(a.rounds):
        for k, f in ways.items():
            w, c, s = time.perf_counter(), time.process_time(), steal_seconds()
            embed(f, x[:a.per_round], a.batch, progress=False)
            dw = time.perf_counter() - w
            speed[k].append(a.per_round / dw)
            for i, d in enumerate((dw, time.process_time() - c, steal_seconds() - s)): meters[k][i] += d
    ratios = [n / o for o, n in zip(*speed.values())]
    print(f"model {name} v{version}; {a.rounds} interleaved rounds of {a.per_round:,} images each way, batch {a.batch}")
    for k in ways:
        w, c, s = meters[k]
        print(f"  {k:<26} {statistics.median(speed[k]):>8,.0f} images/s (median)   wall {w:6.1f} s, CPU {c:6.1f} s, steal {s:5.2f} s")
    print(f"  new/old speed of each round: {', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f}x)")
    w, c, s = time.perf_counter(), time.process_time(), steal_seconds()
    embed(ways["new (one traced graph)"], x[:a.images], a.batch, progress=False)
    w, c, s = time.perf_counter() - w, time.process_time() - c, steal_seconds() - s
    print(f"embed() over {a.images:,} test images: {w:.1f} s ({a.images / w:,.0f} images/s), CPU {c:.1f} s, steal {s:.2f} s")


if __name__ == "__main__":
    main()
