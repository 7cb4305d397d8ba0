#!/usr/bin/env python
"""Training throughput of the custom model on this machine, as a share of its own measured matmul peak.

Measured in one run, on the same machine, with medians over repeats (the machines are shared and noisy):
  1. the matmul peak: median FLOP/s of square matmuls in float32 and in bfloat16 (TensorFlow, all cores);
  2. training: median images/s of the real training step (`fmnist_gcp.training.fit`'s loop, one epoch at a time)
     for each precision, and the achieved FLOP/s = images/s x (3 x forward FLOPs per image).
Forward FLOPs are counted from the layer shapes (2 x multiply-adds of every conv and dense layer).

    .venv/bin/python bench/train_throughput.py                   # the quick recipe's model (TrainConfig's defaults)
    .venv/bin/python bench/train_throughput.py --widths 64,128,256 --batch-size 128  # the full recipe's model
"""
from __future__ import annotations

import argparse
import statistics
import time



def forward_flops(model) -> int:
    "2 x multiply-adds of every Conv2D and Dense layer for one image."
    total = 0
    for layer in model.layers:
        name = type(layer).__name__
        if name == "Conv2D":
            h, w, cout = layer.output.shape[1:]
            kh, kw = layer.kernel_size
            total += 2 * h * w * cout * kh * kw * layer.input.shape[-1]
        elif name == "Dense":
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total)


def matmul_peak(tf, dtype, n=2048, repeats=7) -> float:
    "Median FLOP/s of an n x n matmul."
    a = tf.random.normal((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    f = tf.function(lambda x: tf.matmul(x, x))
    f(a).numpy()
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); f(a).numpy(); times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def main():
    from bench_host import steady_images_per_s  # run as `python bench/train_throughput.py`: bench/ is on the path
    from fmnist_gcp.training import TrainConfig, build_model, parse_widths
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=parse_widths, default=TrainConfig.widths, help="channels of each stage, comma-separated")
    ap.add_argument("--convs", type=int, default=TrainConfig.convs)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--images", type=int, default=6400, help="images per timed epoch")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per precision (after one warm-up)")
    a = ap.parse_args()
    from fmnist_gcp.config import import_tensorflow
    from fmnist_gcp.preprocessing import Augment
    tf = import_tensorflow()
    peak = {"float32": matmul_peak(tf, tf.float32), "mixed_bfloat16": matmul_peak(tf, tf.bfloat16)}
    print(f"matmul peak (median of 7, 2048^2): float32 {peak['float32'] / 1e9:.1f} GFLOP/s, "
          f"bfloat16 {peak['mixed_bfloat16'] / 1e9:.1f} GFLOP/s")
    rows = []
    for precision in ("float32", "mixed_bfloat16"):
        cfg = TrainConfig(widths=a.widths, convs=a.convs, batch_size=a.batch_size, epochs=a.repeats + 1, precision=precision,
                          augment=Augment(True, 2, 0.0))
        flops = forward_flops(build_model(cfg, 0.286, 0.353))
        ips = steady_images_per_s(cfg, a.images)
        achieved = ips * 3 * flops  # forward + backward ~ 3x forward
        rows.append((precision, flops, ips, achieved, achieved / peak[precision]))
    print(f"\nmodel widths {','.join(map(str, a.widths))}, convs {a.convs}, batch {a.batch_size}: {rows[0][1] / 1e6:.1f} forward MFLOP per image")
    print(f"{'precision':<16}{'images/s':>10}{'GFLOP/s':>10}{'share of peak':>15}")
    for p, _, ips, ach, share in rows:
        print(f"{p:<16}{ips:>10.0f}{ach / 1e9:>10.1f}{share:>14.1%}")
    print(f"\nbfloat16 / float32 training speed: {rows[1][2] / rows[0][2]:.2f}x (median of {a.repeats} epochs each)")


if __name__ == "__main__":
    main()
