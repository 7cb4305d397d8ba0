"""The machine a benchmark measurement ran on, recorded next to its figures (shared by the scripts in bench/)."""
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
