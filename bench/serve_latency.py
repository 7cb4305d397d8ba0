#!/usr/bin/env python
"""Prediction-server latency and throughput over loopback, against an in-process `model(x)` floor, in one run.

  1. floor: median time of the bare in-process call (the tf.function the server uses) for 1 image and a batch;
  2. server, sequential: p50/p99 latency of 1-image requests, and images/s of batched requests;
  3. load: N concurrent clients for a fixed time (loopback only, bounded), counting errors.
Targets on 2 cores: p99 <= 15 ms for one image, >= 2,000 images/s batched, 0 errors under load.

    .venv/bin/python bench/serve_latency.py                       # the registry's default version of the custom model
    .venv/bin/python bench/serve_latency.py --model fmnist-cnn@champion --clients 8 --seconds 20

Requests are timed with `serving.request_latency`, the function the serving stage's report uses.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from http import HTTPStatus

import numpy as np


def main():
    from fmnist_gcp.config import DEFAULT_MODEL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=f"{DEFAULT_MODEL}@default")
    ap.add_argument("--requests", type=int, default=500, help="sequential 1-image requests")
    ap.add_argument("--batch", type=int, default=128, help="images per batched request")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients in the load run")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the load run")
    a = ap.parse_args()
    import httpx
    from fmnist_gcp.data import load_split
    from fmnist_gcp.serving import SERVING_CONTRACT, BackgroundServer, Predictor, create_app, model_source, request_latency
    uri, name, version = model_source(a.model)
    pred = Predictor(uri, name, version)
    x, _ = load_split("test", limit=max(a.batch, 256))

    def timed(f, n):  # the in-process floor: the same loop as request_latency, without the HTTP round trip
        ts = []
        for _ in range(n):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        return ts
    floor1 = timed(lambda: pred(x[:1]), 200)
    floorb = timed(lambda: pred(x[:a.batch]), 30)
    route = SERVING_CONTRACT.predict_route

    with BackgroundServer(create_app(lambda: pred)) as srv:
        srv.wait_ready()
        c = httpx.Client(base_url=srv.url, timeout=30)
        one = json.dumps({"instances": [x[0].tolist()]}).encode()
        many = json.dumps({"instances": [im.tolist() for im in x[:a.batch]]}).encode()
        h = {"content-type": "application/json"}
        request_latency(c, one, 20)  # warm-up
        lat = request_latency(c, one, a.requests)
        bat = request_latency(c, many, 30)

        stop, counts, lock = time.time() + a.seconds, {"ok": 0, "errors": 0}, threading.Lock()
        def client():
            with httpx.Client(base_url=srv.url, timeout=30) as cc:
                while time.time() < stop:
                    try: ok = cc.post(route, content=one, headers=h).status_code == HTTPStatus.OK
                    except httpx.HTTPError: ok = False
                    with lock: counts["ok" if ok else "errors"] += 1
        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in threads: t.start()
        for t in threads: t.join()
        c.close()

    ms = lambda s: 1000 * s
    p50, p99 = (ms(float(np.percentile(lat, q))) for q in (50, 99))
    ips_server, ips_floor = a.batch / statistics.median(bat), a.batch / statistics.median(floorb)
    print(f"model {name} v{version}, {a.requests} sequential 1-image requests over loopback")
    print(f"{'':32}{'server':>10}{'in-process floor':>18}{'ratio':>8}")
    print(f"{'1 image, p50 ms':32}{p50:>10.2f}{ms(statistics.median(floor1)):>18.2f}{p50 / ms(statistics.median(floor1)):>8.1f}")
    print(f"{'1 image, p99 ms (target <= 15)':32}{p99:>10.2f}{ms(float(np.percentile(floor1, 99))):>18.2f}")
    print(f"{f'batch {a.batch}, images/s (target >= 2000)':32}{ips_server:>10.0f}{ips_floor:>18.0f}{ips_floor / ips_server:>8.2f}")
    print(f"load: {a.clients} clients x {a.seconds:.0f} s: {counts['ok']} ok ({counts['ok'] / a.seconds:.0f} req/s), {counts['errors']} errors")
    print("targets met:", p99 <= 15 and ips_server >= 2000 and counts["errors"] == 0)


if __name__ == "__main__":
    main()
