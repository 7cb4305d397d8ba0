#!/usr/bin/env python
"""Prediction-server latency and throughput over loopback, against an in-process `model(x)` floor, in one run.

  1. batched: rounds that alternate, call by call, the bare in-process call (the tf.function the server uses) on a
     batch with the same batch sent to the server as one request; each round's server/floor ratio of median times,
     then the median of the rounds (interleaved, so the host's CPU steal falls on both sides alike);
  2. one image: p50/p99 latency of sequential 1-image requests beside the floor's, interleaved the same way;
  3. load: N concurrent clients for a fixed time (loopback only, bounded), counting errors.
Beside every wall time: this process's CPU seconds and the host's steal seconds (/proc/stat) over it.
Targets on 2 cores: batched server/floor <= 1.3, p99 <= 15 ms for one image, 0 errors under load.

    .venv/bin/python bench/serve_latency.py                       # the registry's default version of the custom model
    .venv/bin/python bench/serve_latency.py --model fmnist-cnn@champion --clients 8 --seconds 20
    .venv/bin/python bench/serve_latency.py --format png          # batched requests as base64 PNG instances

Requests are timed with `serving.request_latency`, the function the serving stage's report uses.
"""
from __future__ import annotations

import argparse
import base64
import json
import statistics
import threading
import time
from http import HTTPStatus

import numpy as np


class Meter:
    "Wall, process CPU and host steal seconds over a block: `with m: ...`, then m.wall, m.cpu, m.steal (summed)."
    def __init__(self): self.wall = self.cpu = self.steal = 0.0
    def __enter__(self):
        from bench_host import steal_seconds  # run as `python bench/serve_latency.py`: bench/ is on the path
        self._t = (time.perf_counter(), time.process_time(), steal_seconds()); return self
    def __exit__(self, *exc):
        from bench_host import steal_seconds
        w, c, s = self._t
        self.wall += time.perf_counter() - w; self.cpu += time.process_time() - c; self.steal += steal_seconds() - s


def timed(f, n: int) -> list[float]:
    "Seconds each of `n` calls of `f` took (the same loop as request_latency, without the HTTP round trip)."
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return ts


def interleaved(floor, server, rounds: int, per_round: int) -> dict:
    "`rounds` rounds of `per_round` (floor call, server call) pairs, alternating call by call; times, meters, per-round ratios."
    out = {"floor": [], "server": [], "ratios": [], "meters": {"floor": Meter(), "server": Meter()}}
    for _ in range(rounds):
        f, s = [], []
        for _ in range(per_round):
            with out["meters"]["floor"]: f += timed(floor, 1)
            with out["meters"]["server"]: s += list(server(1))
        out["floor"] += f; out["server"] += s
        out["ratios"].append(statistics.median(s) / statistics.median(f))
    return out


def meter_line(name: str, m: Meter) -> str:
    return f"  {name:<8} wall {m.wall:6.2f} s, process CPU {m.cpu:6.2f} s, host steal {m.steal:5.2f} s"


def main():
    from fmnist_gcp.config import DEFAULT_MODEL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=f"{DEFAULT_MODEL}@default")
    ap.add_argument("--requests", type=int, default=300, help="1-image requests (and floor calls), over all rounds")
    ap.add_argument("--batch", type=int, default=128, help="images per batched request")
    ap.add_argument("--batches", type=int, default=15, help="batched requests (and floor calls) per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the ratio is their median; at least 3)")
    ap.add_argument("--out", help="also append the JSON line to this file")
    ap.add_argument("--format", choices=("pixels", "png"), default="pixels", help="instances of the batched requests")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients in the load run")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the load run")
    a = ap.parse_args()
    if a.rounds < 3: ap.error("--rounds: at least 3 (the ratio is a median over rounds)")
    import httpx
    from fmnist_gcp.data import load_split
    from fmnist_gcp.preprocessing import png_bytes
    from fmnist_gcp.serving import SERVING_CONTRACT, BackgroundServer, Predictor, create_app, model_source, request_latency
    uri, name, version = model_source(a.model)
    pred = Predictor(uri, name, version)
    x, _ = load_split("test", limit=max(a.batch, 256))
    route, h = SERVING_CONTRACT.predict_route, {"content-type": "application/json"}
    one = json.dumps({"instances": [x[0].tolist()]}).encode()
    as_instance = (lambda im: im.tolist()) if a.format == "pixels" else (lambda im: {"content": base64.b64encode(png_bytes(im)).decode()})
    many = json.dumps({"instances": [as_instance(im) for im in x[:a.batch]]}).encode()

    with BackgroundServer(create_app(lambda: pred)) as srv:
        srv.wait_ready()
        c = httpx.Client(base_url=srv.url, timeout=30)
        request_latency(c, one, 20); request_latency(c, many, 3); pred(x[:a.batch])  # warm-up
        bat = interleaved(lambda: pred(x[:a.batch]), lambda n: request_latency(c, many, n), a.rounds, a.batches)
        per = max(1, a.requests // a.rounds)
        sing = interleaved(lambda: pred(x[:1]), lambda n: request_latency(c, one, n), a.rounds, per)

        stop, counts, lock = time.time() + a.seconds, {"ok": 0, "errors": 0}, threading.Lock()
        def client():
            with httpx.Client(base_url=srv.url, timeout=30) as cc:
                while time.time() < stop:
                    try: ok = cc.post(route, content=one, headers=h).status_code == HTTPStatus.OK
                    except httpx.HTTPError: ok = False
                    with lock: counts["ok" if ok else "errors"] += 1
        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        load = Meter()
        with load:
            for t in threads: t.start()
            for t in threads: t.join()
        c.close()

    ms = lambda s: 1000 * s
    med = statistics.median
    ratio = med(bat["ratios"])
    ips_server, ips_floor = a.batch / med(bat["server"]), a.batch / med(bat["floor"])
    p50, p99 = (ms(float(np.percentile(sing["server"], q))) for q in (50, 99))
    f50, f99 = (ms(float(np.percentile(sing["floor"], q))) for q in (50, 99))
    print(f"model {name} v{version}; {a.rounds} interleaved rounds of {a.batches} batched and {per} 1-image calls each way")
    print(f"{'':36}{'server':>10}{'in-process floor':>18}{'ratio':>8}")
    print(f"{f'batch {a.batch} ({a.format}), images/s':36}{ips_server:>10.0f}{ips_floor:>18.0f}{ratio:>8.2f}")
    print(f"  server/floor of each round: {', '.join(f'{r:.2f}' for r in bat['ratios'])} (median {ratio:.2f}, target <= 1.3)")
    for k in ("floor", "server"): print(meter_line(k, bat["meters"][k]))
    print(f"{'1 image, p50 ms':36}{p50:>10.2f}{f50:>18.2f}{med(sing['ratios']):>8.1f}")
    print(f"{'1 image, p99 ms (target <= 15)':36}{p99:>10.2f}{f99:>18.2f}")
    for k in ("floor", "server"): print(meter_line(k, sing["meters"][k]))
    print(f"load: {a.clients} clients x {a.seconds:.0f} s: {counts['ok']} ok ({counts['ok'] / a.seconds:.0f} req/s), {counts['errors']} errors")
    print(meter_line("load", load))
    line = json.dumps({"batch": a.batch, "format": a.format, "server_over_floor": round(ratio, 3),
                      "round_ratios": [round(r, 3) for r in bat["ratios"]], "images_per_s_server": round(ips_server),
                      "images_per_s_floor": round(ips_floor), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
                      "floor_p50_ms": round(f50, 2), "load_ok": counts["ok"], "load_errors": counts["errors"],
                      "steal_s": round(bat["meters"]["floor"].steal + bat["meters"]["server"].steal, 2)})
    print(line)
    if a.out:
        with open(a.out, "a") as f: f.write(line + "\n")
    print("targets met:", ratio <= 1.3 and p99 <= 15 and counts["errors"] == 0)


if __name__ == "__main__":
    main()
