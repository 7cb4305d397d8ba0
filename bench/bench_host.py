"""Shared by the scripts in bench/: the machine a measurement ran on, and the steady training speed they all time."""
from __future__ import annotations

import os


def host() -> dict:
    "CPU model, core count, load average, and the Keras version and backend."
    import keras
    try:
        with open("/proc/cpuinfo") as f: cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError: cpu = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
            "keras": keras.__version__, "backend": keras.backend.backend()}


def steal_seconds() -> float:
    "Seconds of CPU time the hypervisor took from this machine since boot, all cores (`/proc/stat` steal); 0 where unknown."
    from fmnist_gcp.training import steal_seconds as steal  # the training history records it with the same reading
    return steal()


def steady_images_per_s(cfg, images: int) -> float:
    "Median images/s of `training.fit` on `images` random images per epoch, `cfg.epochs` epochs, the first (which traces the step) left out."
    import statistics

    import numpy as np

    from fmnist_gcp.training import fit
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (images, 28, 28), dtype=np.uint8), rng.integers(0, 10, images)
    _, hist = fit(cfg, x, y, x[:256], y[:256], 0.286, 0.353, log=lambda *_: None)
    return statistics.median(h["images_per_s"] for h in hist[1:])
