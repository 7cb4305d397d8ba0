#!/usr/bin/env python
"""The container images built and run on this machine: a Debian base, the serve and train images, each one run.

No container registry can be reached here, so `python:3.11-slim` is stood in for by a Debian bookworm root made
with mmdebstrap (Debian's python3.11, a venv at /opt/venv on PATH so the Dockerfile's `python` and `pip` lines run
unchanged), imported into buildah as localhost/fmnist-base:bookworm (made once, kept). Then:

  1. build: `buildah bud --isolation chroot --layers --target serve|train --build-arg BASE=<base>` of docker/Dockerfile
     (to a temporary tag, tagged localhost/fmnist-<target>:local only when the build succeeded); each image's size;
  2. train-gpu: `pip install --dry-run '.[gpu,pipeline]'` in a container of the base (resolves, installs nothing);
  3. train: in a container of the train image (podman cannot run containers here, so `buildah run --isolation
     chroot`: the image's root, env and working directory, the host's network), `fmnist run --profile smoke` on the
     real IDX files, then the image's ENTRYPOINT (`python -m fmnist_gcp.task`) with AIP_MODEL_DIR,
     AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR; checks the run's manifest says ok and the task wrote a model;
  4. serve: the serve image's ENTRYPOINT (`fmnist serve --host 0.0.0.0`) with Vertex's AIP_HTTP_PORT,
     AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE (the path the SDK's REST client posts to) and AIP_STORAGE_URI at the model
     the task wrote (the folder a Vertex model upload names); seconds to healthy; a prediction of real test images
     through google.cloud.aiplatform_v1.PredictionServiceClient over REST, checked for shape, accuracy and against
     the same model run outside the container.

    sudo .venv/bin/python bench/images.py           # what `make images` runs (root: buildah and mmdebstrap need it)
    .venv/bin/python bench/images.py --rebuild-base # make the Debian base again

A failed step prints its name, the command and the last lines of its output, and exits 1; working containers are
removed whatever happens, and a failed build leaves no image tagged.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASE = "localhost/fmnist-base:bookworm"
TARGETS = ("serve", "train")  # built and run; train-gpu is only resolved (its CUDA wheels are gigabytes)
IMAGE = "localhost/fmnist-{}:local"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = "python3.11,python3-venv,ca-certificates"  # python3-venv brings the pip wheel the venv installs
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")  # as slim images do
VENV = "/opt/venv"
# The CAs this machine added to its trust store (a TLS-inspecting proxy's, say) go into the base too, and pip and
# requests read the system bundle, as Debian's own pip does (a venv's pip would read its vendored certifi instead)
LOCAL_CAS = "/usr/local/share/ca-certificates"
TRUST_HOST_CAS = (f'for f in {LOCAL_CAS}/*.crt; do [ -e "$f" ] && cp "$f" "$1{LOCAL_CAS}/"; done; '
                  'chroot "$1" update-ca-certificates --fresh >/dev/null')
SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"
PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DATA_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
PREDICT_ROUTE = "/v1/projects/{p}/locations/{l}/endpoints/{e}:predict"  # what the SDK's REST client posts to
MIN_ACCURACY = 0.4  # top-1 on the first 64 test images: the task's model is small (chance is 0.10)
ENDPOINT = dict(p="fmnist-local", l="europe-west4", e="1234")
# the task on the smoke run's TFRecords (600 training images): about 15 s, about 0.6 top-1 (the smoke run's own
# registered model, a few steps on a tiny slice, is near chance, so the server gets this one)
TASK_ARGS = ["--epochs", "15", "--batch-size", "64", "--widths", "16,32", "--convs", "1", "--lr", "0.01",
             "--precision", "float32", "--no-tta-flip"]


class StepFailed(Exception):
    "A step that failed: its name, the command and the end of its output."
    def __init__(self, step: str, cmd, output: str = "", why: str = ""):
        tail = "\n".join(output.rstrip().splitlines()[-25:])
        cmd = cmd if isinstance(cmd, str) else shlex.join(map(str, cmd))
        super().__init__(f"step '{step}' failed{': ' + why if why else ''}\n  command: {cmd}" + (f"\n  last lines of its output:\n{tail}" if tail else ""))


def sh(step: str, cmd: list, timeout: float = 3600, **kw) -> str:
    "Run `cmd`; its output (stdout and stderr together), or StepFailed with the last lines."
    try: r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e: raise StepFailed(step, cmd, (e.output or b"").decode(errors="replace") if isinstance(e.output, bytes) else (e.output or ""), f"no answer after {timeout:.0f} s") from None
    except FileNotFoundError: raise StepFailed(step, cmd, why=f"{cmd[0]} is not installed (as root: apt-get install -y mmdebstrap buildah)") from None
    if r.returncode: raise StepFailed(step, cmd, r.stdout, f"exit status {r.returncode}")
    return r.stdout


def image_exists(name: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", name], capture_output=True).returncode == 0


def image_id(name: str) -> str | None:
    r = subprocess.run(["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", name], capture_output=True, text=True)
    return r.stdout.strip() or None if r.returncode == 0 else None


def image_size(name: str) -> str:
    "The image's size (its layers, uncompressed), as `buildah images` prints it: '1.2 GB'."
    return json.loads(sh("size", ["buildah", "images", "--json", name]))[0]["size"]


def image_config(name: str) -> dict:
    "The image's OCI config: Entrypoint, Env, WorkingDir, ExposedPorts."
    return json.loads(sh("inspect", ["buildah", "inspect", "--type", "image", name]))["OCIv1"]["config"]


def make_base(rebuild: bool = False) -> tuple[float, bool]:
    "The Debian stand-in for python:3.11-slim as BASE; (seconds, made now). Kept between runs unless `rebuild`."
    if image_exists(BASE) and not rebuild: return 0.0, False
    t0, tmp_tag, ctr = time.perf_counter(), f"{BASE}-tmp-{os.getpid()}", None
    with tempfile.TemporaryDirectory(prefix="fmnist-base-") as d:
        tar = Path(d) / "root.tar"
        sh("base: mmdebstrap", ["mmdebstrap", "--variant=minbase", "--aptopt=APT::Install-Recommends \"false\"",
                                *[f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES], "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                                f"--include={BASE_PACKAGES}", f"--customize-hook=chroot \"$1\" python3.11 -m venv {VENV}",
                                f"--customize-hook={TRUST_HOST_CAS}",
                                "bookworm", str(tar), MIRROR], timeout=1800)
        try:
            ctr = sh("base: import", ["buildah", "from", "scratch"]).strip().splitlines()[-1]
            sh("base: import", ["buildah", "add", ctr, str(tar), "/"])
            sh("base: import", ["buildah", "config", "--env", f"PATH={PATH}", "--env", "LANG=C.UTF-8",
                                "--env", f"PIP_CERT={SYSTEM_CAS}", "--env", f"REQUESTS_CA_BUNDLE={SYSTEM_CAS}",
                                "--cmd", "python3", "--label", "org.opencontainers.image.description=Debian bookworm python3.11 (venv at /opt/venv), fmnist-gcp's stand-in for python:3.11-slim", ctr])
            sh("base: check", ["buildah", "run", "--isolation", "chroot", ctr, "--", "sh", "-c",
                               "command -v python pip && python -c 'import sys, ssl; assert sys.version_info[:2] == (3, 11), sys.version' "
                               "&& pip download --no-deps --quiet -d /tmp/probe 'setuptools>=77' && rm -rf /tmp/probe"])  # PyPI over TLS
            sh("base: commit", ["buildah", "commit", "--rm", ctr, tmp_tag]); ctr = None
            old = image_id(BASE)
            sh("base: tag", ["buildah", "tag", tmp_tag, BASE])
            if old: subprocess.run(["buildah", "rmi", old], capture_output=True)  # the base it replaced (kept while in use)
        finally:
            if ctr: subprocess.run(["buildah", "rm", ctr], capture_output=True)
            subprocess.run(["buildah", "rmi", tmp_tag], capture_output=True)  # only the temporary name
    return time.perf_counter() - t0, True


def build(target: str) -> float:
    "Build one Dockerfile target on BASE as IMAGE; seconds. Tagged only when the build succeeded."
    name, tmp_tag, t0 = IMAGE.format(target), IMAGE.format(target) + f"-tmp-{os.getpid()}", time.perf_counter()
    log = Path(tempfile.gettempdir()) / f"fmnist-images-build-{target}.log"
    cmd = ["buildah", "bud", "--isolation", "chroot", "--layers", "--force-rm", "-f", "docker/Dockerfile", "--target", target,
           "--build-arg", f"BASE={BASE}", "-t", tmp_tag, "."]
    print(f"  building {target} (log: {log}) ...", flush=True)
    try:
        with open(log, "w") as f: r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=7200)
        if r.returncode: raise StepFailed(f"build {target}", cmd, log.read_text(errors="replace"), f"exit status {r.returncode}")
        sh(f"tag {target}", ["buildah", "tag", tmp_tag, name])
    finally:
        subprocess.run(["buildah", "rmi", tmp_tag], capture_output=True)  # the temporary name (the layers stay cached)
    return time.perf_counter() - t0


class Container:
    "A working container of an image; `run` runs a command in its root (buildah run --isolation chroot)."
    def __init__(self, image: str, mounts: dict[str, str] | None = None):  # {host path: container path[:ro]}
        self.image, self.mounts = image, mounts or {}
        self.name = f"fmnist-images-{image.rsplit('/', 1)[-1].split(':')[0]}-{os.getpid()}"
        subprocess.run(["buildah", "rm", self.name], capture_output=True)  # a leftover of a killed run with this pid
        sh("container", ["buildah", "from", "--name", self.name, image])

    def argv(self, cmd: list[str], env: dict[str, str] | None = None) -> list[str]:
        return ["buildah", "run", "--isolation", "chroot", *[a for h, c in self.mounts.items() for a in ("-v", f"{h}:{c}")],
                *[a for k, v in (env or {}).items() for a in ("--env", f"{k}={v}")], self.name, "--", *cmd]

    def run(self, step: str, cmd: list[str], env: dict[str, str] | None = None, timeout: float = 3600) -> str:
        return sh(step, self.argv(cmd, env), timeout)

    def copy(self, step: str, src: list[str], dest: str) -> None:
        sh(step, ["buildah", "copy", self.name, *src, dest], cwd=ROOT)

    def remove(self) -> None: subprocess.run(["buildah", "rm", self.name], capture_output=True)
    def __enter__(self): return self
    def __exit__(self, *exc): self.remove()


def resolve_gpu() -> str:
    "train-gpu: pip resolves `.[gpu,pipeline]` (what its RUN line installs) in a container of the base; a summary."
    with Container(BASE) as c:
        c.run("train-gpu: resolve", ["mkdir", "-p", "/app"])
        c.copy("train-gpu: copy", ["pyproject.toml", "README.md"], "/app/")
        c.copy("train-gpu: copy", ["fmnist_gcp"], "/app/fmnist_gcp")
        # a current pip first, in this throwaway container only: Debian's pip 23.0 reads no PEP 714 metadata files,
        # so it downloads every CUDA wheel (gigabytes, minutes) just to read its dependencies
        c.run("train-gpu: upgrade pip", ["pip", "install", "--quiet", "--upgrade", "pip"], timeout=600)
        out = c.run("train-gpu: resolve", ["sh", "-c", "cd /app && pip install --dry-run --quiet --report /tmp/r.json '.[gpu,pipeline]' "
                                           "&& python -c \"import json; r = json.load(open('/tmp/r.json'))['install']; "
                                           "print(len(r), *sorted(i['metadata']['name'] + '==' + i['metadata']['version'] for i in r "
                                           "if i['metadata']['name'].lower().startswith(('tensorflow', 'nvidia-cudnn', 'keras'))))\""], timeout=1800)
    n, *pins = out.strip().splitlines()[-1].split()
    if not any(p.lower().startswith("tensorflow==") for p in pins) or not any("cudnn" in p for p in pins):
        raise StepFailed("train-gpu: resolve", "pip install --dry-run '.[gpu,pipeline]'", out, "no tensorflow or cuDNN in what pip would install")
    return f"resolves: {n} packages ({', '.join(pins)})"


def run_train(work: Path) -> tuple[str, Path]:
    "The train image: a smoke run of the pipeline, then its ENTRYPOINT with the AIP_* folders; (summary, the task's model dir)."
    image = IMAGE.format("train")
    entry = image_config(image)["Entrypoint"]
    # the IDX files at Debian's path inside too: 07_training's notebook test trains on Settings.from_env({"FMNIST_HOME":
    # ...}), which drops FMNIST_DATA_DIR, and the image cannot download them here
    env = {"FMNIST_DATA_DIR": DATA_DIR, "FMNIST_HOME": "/work/home", "FMNIST_RUNS_DIR": "/work/runs"}
    with Container(image, {DATA_DIR: f"{DATA_DIR}:ro", str(work): "/work"}) as c:
        t0 = time.perf_counter()
        c.run("train: fmnist run --profile smoke", ["fmnist", "run", "--profile", "smoke", "--run-id", "images-smoke"], env, timeout=3600)
        smoke_s = time.perf_counter() - t0
        manifest = json.loads((work / "runs/images-smoke/run.json").read_text())
        if manifest.get("status") != "ok":
            bad = [f"{s['stage']}: {s['status']}" for s in manifest.get("stages", []) if s.get("status") != "ok"]
            raise StepFailed("train: fmnist run --profile smoke", "fmnist run --profile smoke", "\n".join(bad), f"the manifest says {manifest.get('status')!r}")
        aip = {"AIP_MODEL_DIR": "/work/task/model", "AIP_CHECKPOINT_DIR": "/work/task/checkpoints", "AIP_TENSORBOARD_LOG_DIR": "/work/task/logs"}
        t0 = time.perf_counter()
        c.run("train: " + " ".join(entry), [*entry, *TASK_ARGS, "--metrics-file", "/work/task/metrics.json"], {**env, **aip}, timeout=1800)
        task_s = time.perf_counter() - t0
    model = work / "task/model/model.keras"
    if not model.exists(): raise StepFailed("train: " + " ".join(entry), entry, "", f"the task exited 0 but wrote no {model}")
    acc = json.loads((work / "task/metrics.json").read_text())["val_accuracy"]
    if not list((work / "task/checkpoints").rglob("*")): raise StepFailed("train: task", entry, "", "no checkpoint written to AIP_CHECKPOINT_DIR")
    return (f"smoke run ok ({len(manifest['stages'])} stages, {smoke_s:.0f} s); task wrote model.keras "
            f"(val acc {acc:.3f}, {task_s:.0f} s)"), model.parent


def free_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def run_serve(model_dir: Path, n: int = 64) -> tuple[str, float]:
    "The serve image's ENTRYPOINT with Vertex's env; (summary, seconds to healthy). Predicts n real test images via the SDK."
    image = IMAGE.format("serve")
    entry, port, route = image_config(image)["Entrypoint"], free_port(), PREDICT_ROUTE.format(**ENDPOINT)
    env = {"AIP_HTTP_PORT": str(port), "AIP_HEALTH_ROUTE": "/health", "AIP_PREDICT_ROUTE": route, "AIP_STORAGE_URI": "/model",
           "AIP_DEPLOYED_MODEL_ID": "images-check"}
    with Container(image, {str(model_dir): "/model:ro"}) as c, tempfile.TemporaryFile("w+") as log:
        argv = c.argv(entry, env)
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            healthy = wait_healthy(f"http://127.0.0.1:{port}/health", proc, timeout=300)
            if healthy is None:
                log.seek(0); raise StepFailed("serve: " + " ".join(entry), argv, log.read(), "not healthy after 300 s" if proc.poll() is None else f"exited with {proc.returncode}")
            ready_s = time.perf_counter() - t0
            try: summary = sdk_predict(port, n, model_dir)
            except StepFailed: raise
            except Exception as e:
                log.seek(0); raise StepFailed("serve: predict (aiplatform_v1 REST client)", f"POST {route}", log.read(), f"{type(e).__name__}: {e}") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try: proc.wait(30)
                except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    return summary, ready_s


def wait_healthy(url: str, proc, timeout: float) -> dict | None:
    "The health route's JSON once it answers 200; None when the server exited or the time ran out."
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return json.loads(r.read() or b"{}")
        except OSError: pass
        time.sleep(0.25)
    return None


def sdk_predict(port: int, n: int, model_dir: Path) -> str:
    """n real test images through the SDK's REST client; checks one answer per image, ten classes, accuracy above
    chance, and the same confidences as `model_dir`'s model.keras gives in this process."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform_v1
    from fmnist_gcp.cloud.endpoints import png_instances
    from fmnist_gcp.data import load_split
    from fmnist_gcp.serving import ALL_CLASSES, AUTOML_LABELS, Predictor
    x, y = load_split("test", limit=n)
    client = aiplatform_v1.PredictionServiceClient(transport="rest", credentials=AnonymousCredentials(),
                                                   client_options=ClientOptions(api_endpoint=f"http://127.0.0.1:{port}"))
    endpoint = client.endpoint_path(ENDPOINT["p"], ENDPOINT["l"], ENDPOINT["e"])
    r = client.predict(endpoint=endpoint, instances=png_instances(x), parameters=ALL_CLASSES)
    answer = aiplatform_v1.PredictResponse.to_dict(r)  # plain JSON values, as the client decoded them
    preds = answer["predictions"]
    problems = []
    if len(preds) != n: problems.append(f"{len(preds)} predictions for {n} instances")
    if any(sorted(p["displayNames"]) != sorted(AUTOML_LABELS) or abs(sum(p["confidences"]) - 1) > 1e-3 for p in preds):
        problems.append("a prediction without the ten classes or whose confidences do not sum to 1")
    if answer["deployed_model_id"] != "images-check": problems.append(f"deployedModelId {answer['deployed_model_id']!r}, not AIP_DEPLOYED_MODEL_ID")
    top = [AUTOML_LABELS.index(p["displayNames"][0]) for p in preds]
    acc = sum(int(t == int(l)) for t, l in zip(top, y)) / n
    if acc < MIN_ACCURACY: problems.append(f"top-1 accuracy {acc:.2f} on {n} real test images (chance is 0.10; at least {MIN_ACCURACY} expected)")
    # the same model.keras in this process (the host's TensorFlow): the container serves what the model says
    local = Predictor(str(model_dir / "model.keras"))(x)
    served = np.array([[c for _, c in sorted(zip(map(int, p["ids"]), p["confidences"]))] for p in preds])
    if served.shape != local.shape or not np.allclose(served, local, atol=1e-4):
        problems.append(f"served confidences differ from the model run here by up to {np.abs(served - local).max() if served.shape == local.shape else 'a shape'}")
    if problems: raise StepFailed("serve: predict (aiplatform_v1 REST client)", f"PredictionServiceClient.predict({endpoint})", json.dumps(preds[:2]), "; ".join(problems))
    return f"SDK REST predict: {n} real test images, top-1 {acc:.2f}, first '{preds[0]['displayNames'][0]}' (true '{AUTOML_LABELS[int(y[0])]}')"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild-base", action="store_true", help="make the Debian base again (otherwise kept)")
    ap.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (the smoke run, the task's model); default: a temporary folder")
    a = ap.parse_args(argv)
    if os.geteuid() != 0: print("bench/images.py: run as root (buildah and mmdebstrap need it): sudo make images", file=sys.stderr); return 1
    missing = [t for t in ("buildah", "mmdebstrap") if not shutil.which(t)]
    if missing: print(f"bench/images.py: {', '.join(missing)} not installed: apt-get install -y mmdebstrap buildah", file=sys.stderr); return 1
    if not Path(DATA_DIR, "t10k-images-idx3-ubyte.gz").exists():
        print(f"bench/images.py: no Fashion-MNIST in {DATA_DIR}: apt-get install -y dataset-fashion-mnist", file=sys.stderr); return 1
    rows, t_all = {}, time.perf_counter()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="fmnist-images-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print("base ...", flush=True)
        secs, made = make_base(a.rebuild_base)
        rows["base"] = [BASE, image_size(BASE), f"{secs:.0f}" if made else "kept", "python3.11 + pip in /opt/venv", ""]
        for t in TARGETS:
            print(f"build {t} ...", flush=True)
            secs = build(t)
            rows[t] = [IMAGE.format(t), image_size(IMAGE.format(t)), f"{secs:.0f}", "", ""]
        print("train-gpu: pip install --dry-run '.[gpu,pipeline]' ...", flush=True)
        t0 = time.perf_counter(); gpu = resolve_gpu()
        rows["train-gpu"] = ["(not built)", "", f"{time.perf_counter() - t0:.0f} (resolve)", gpu, ""]
        print("train: fmnist run --profile smoke, then python -m fmnist_gcp.task ...", flush=True)
        rows["train"][3], model_dir = run_train(work)
        print(f"serve: fmnist serve --host 0.0.0.0 on {model_dir.relative_to(work)} ...", flush=True)
        rows["serve"][3], ready = run_serve(model_dir)
        rows["serve"][4] = f"{ready:.1f}"
    except StepFailed as e:
        print(f"bench/images.py: {e}", file=sys.stderr); return 1
    finally:
        if not a.keep: shutil.rmtree(work, ignore_errors=True)
    head = ["target", "image", "size", "build s", "run", "serve s to healthy"]
    table = [[t, *r] for t, r in rows.items()]
    widths = [max(len(str(r[i])) for r in [head, *table]) for i in range(5)]
    for r in [head, *table]: print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)) + "  " + r[5])
    print(f"all steps ok in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
