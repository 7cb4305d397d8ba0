"""The images, checked by what they do, without Docker (it cannot run here).

Each image's build is replayed from docker/Dockerfile: the files its COPY lines name, and only those, go into a
scratch build context; its RUN commands run there; its ENTRYPOINT runs with `--help` in a bare environment (the
Dockerfile's ENV, nothing of ours) that imports the package from the context, not from this checkout.

`pip install ".[extras]"` is the one step not run as written: the venv's setuptools (65) cannot build this
pyproject.toml (a PEP 639 license string) and offline it cannot fetch a newer one, as the image's pip does. So the
replay checks what that build needs from the context (the readme, the package, the version attribute, the extras
it names) and puts the copied package on PYTHONPATH, and a console script runs as pip's wrapper runs it: the
`[project.scripts]` entry of the copied pyproject.toml. The serving image installs no `pipeline` extra; its check
serves a model with the modules of that extra made unimportable.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT


def parse_dockerfile(text: str) -> dict[str, dict]:
    "Stages by name: base, env, workdir, copies [(sources, dest)], runs, expose, entrypoint (a stage inherits its FROM stage)."
    stages, cur, args = {}, None, {}
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"): continue
        op, _, arg = line.partition(" ")
        op = op.upper()
        if op == "ARG":  # before the first FROM: a default that FROM lines substitute (`--build-arg` overrides it)
            assert cur is None, f"ARG {arg} inside a stage: this test only replays ARGs before the first FROM"
            name, _, default = arg.partition("="); args[name] = default
        elif op == "FROM":
            image, _, name = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], arg).partition(" AS ")
            parent = stages.get(image.strip(), {"base": image.strip(), "env": {}, "workdir": "/", "copies": [], "runs": [], "expose": [], "entrypoint": None})
            cur = stages[name.strip()] = json.loads(json.dumps(parent))  # a deep copy
        elif op == "ENV": cur["env"].update(kv.split("=", 1) for kv in shlex.split(arg))
        elif op == "WORKDIR": cur["workdir"] = arg
        elif op == "COPY": *src, dest = arg.split(); cur["copies"].append((src, dest))
        elif op == "RUN": cur["runs"].append(arg)
        elif op == "EXPOSE": cur["expose"] += [int(p) for p in arg.split()]
        elif op == "ENTRYPOINT": cur["entrypoint"] = json.loads(arg)
        else: raise AssertionError(f"docker/Dockerfile uses {op}, which this test does not replay: teach it")
    return stages


STAGES = parse_dockerfile((ROOT / "docker/Dockerfile").read_text())
TARGETS = ("train", "train-gpu", "serve")  # the images; fmnist_gcp.cloud.build.IMAGE_TARGETS names the same
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


class Image:
    "One stage's build replayed in `root` (the image's WORKDIR): copies, RUN commands, then the ENTRYPOINT."
    def __init__(self, stage: str, root):
        assert stage in STAGES, f"no stage {stage!r} in docker/Dockerfile: {sorted(STAGES)}"
        self.spec, self.root = STAGES[stage], root
        root.mkdir(parents=True, exist_ok=True)
        for src, dest in self.spec["copies"]:  # Docker's rules: a folder's contents go into dest, a file into dest/
            for s in src:
                if (ROOT / s).is_dir(): shutil.copytree(ROOT / s, root / dest, dirs_exist_ok=True); continue
                target = root / dest / (ROOT / s).name if dest.endswith("/") or len(src) > 1 else root / dest
                target.parent.mkdir(parents=True, exist_ok=True); shutil.copy(ROOT / s, target)
        inside = lambda v: v == self.spec["workdir"] or v.startswith(self.spec["workdir"].rstrip("/") + "/")
        env = {k: str(root) + v[len(self.spec["workdir"]):] if inside(v) else v for k, v in self.spec["env"].items()}
        self.env = {"PATH": os.environ["PATH"], "HOME": str(root), **env, "PYTHONPATH": str(root)}  # WORKDIR paths: root's
        self.extras = None  # the extras its `pip install` names
        for cmd in (shlex.split(c) for r in self.spec["runs"] for c in r.split("&&")):
            m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", cmd[2]) if cmd[:2] == ["pip", "install"] and len(cmd) == 3 else None
            if m: self.check_installable(m[1].split(",") if m[1] else [])
            else: self.run(*cmd)

    def check_installable(self, extras: list[str]) -> None:
        "What building the package from the context needs: the pyproject's readme, package, version attribute, extras."
        proj = tomllib.loads((self.root / "pyproject.toml").read_text())
        missing = set(extras) - set(proj["project"].get("optional-dependencies", {}))
        assert not missing, f"pip install names extras pyproject.toml does not define: {sorted(missing)}"
        self.extras = extras
        assert (self.root / proj["project"]["readme"]).exists(), "COPY misses the readme pyproject.toml names"
        for pkg in (p for p in proj["tool"]["setuptools"]["packages"]["find"]["include"] if "*" not in p):  # globs name subpackages
            assert (self.root / pkg / "__init__.py").exists(), f"COPY misses the package {pkg}"
        mod, _, attr = proj["tool"]["setuptools"]["dynamic"]["version"]["attr"].rpartition(".")
        self.run("python", "-c", f"import {mod}; print({mod}.{attr})")

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        "Run a command of the image; `python` is this interpreter, a console script its [project.scripts] entry."
        if argv[0] == "python": argv = (sys.executable, *argv[1:])
        else:
            scripts = tomllib.loads((self.root / "pyproject.toml").read_text())["project"]["scripts"]
            assert argv[0] in scripts, f"{argv[0]!r} is not a console script of the copied pyproject.toml"
            mod, fn = scripts[argv[0]].split(":")
            argv = (sys.executable, "-c", f"import sys; from {mod} import {fn}; sys.argv[0] = {argv[0]!r}; sys.exit({fn}())", *argv[1:])
        r = subprocess.run(argv, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (argv, r.stdout[-2000:], r.stderr[-2000:])
        return r

    def entrypoint(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(*self.spec["entrypoint"], *args)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {s: Image(s, root / s) for s in TARGETS}


def test_build_context_holds_only_what_copy_names_and_imports_from_there(images):
    img = images["train"]
    assert sorted(p.name for p in img.root.iterdir()) == ["README.md", "fmnist_gcp", "nbs", "pyproject.toml"]
    assert sorted(p.name for p in images["serve"].root.iterdir()) == ["README.md", "fmnist_gcp", "pyproject.toml"]
    where = img.run("python", "-c", "import fmnist_gcp.task; print(fmnist_gcp.task.__file__)").stdout.strip()
    assert where.startswith(str(img.root)), f"the replay imported {where}, not the build context's package"


def test_train_image_runs_the_task_module_the_custom_job_names(images):
    from fmnist_gcp.cloud.jobs import worker_pool_specs
    img = images["train"]
    assert img.spec["entrypoint"] == worker_pool_specs("img", [])[0]["container_spec"]["command"]
    out = img.entrypoint("--help").stdout
    assert "usage: python -m fmnist_gcp.task" in out and "--model-dir" in out, out


PLAN_CHECK = """
import os
from fmnist_gcp.pipeline.params import plan_run
from fmnist_gcp.pipeline.stages import STAGES, nbs_dir
assert str(nbs_dir()) == os.environ["FMNIST_NBS_DIR"], (nbs_dir(), os.environ["FMNIST_NBS_DIR"])
print(len(plan_run("smoke", run_id="r1")) == len(STAGES))
"""


@pytest.mark.parametrize("target", ["train", "train-gpu"])
def test_training_images_carry_the_notebooks_fmnist_run_executes(images, target):
    # `fmnist run --on vertex` runs `fmnist run` in these images (fmnist_gcp.cloud.runs.RUN_COMMAND); pip installs the
    # package into site-packages, so the notebooks are found through FMNIST_NBS_DIR, not next to the package
    from fmnist_gcp.cloud.runs import CPU_IMAGE, GPU_IMAGE, RUN_COMMAND
    img = images[target]
    assert target in (CPU_IMAGE, GPU_IMAGE) and img.spec["env"]["FMNIST_NBS_DIR"] == img.spec["workdir"] + "/nbs"
    assert img.run("python", "-c", PLAN_CHECK).stdout.strip() == "True"
    assert "usage: fmnist run" in img.run(*RUN_COMMAND, "--help").stdout
    assert "FMNIST_NBS_DIR" not in images["serve"].spec["env"]


def test_serve_image_runs_fmnist_serve_on_all_interfaces_on_the_serving_port(images):
    from fmnist_gcp.serving import SERVING_CONTRACT
    img = images["serve"]
    assert img.spec["expose"] == [SERVING_CONTRACT.port]
    out = img.entrypoint("--help").stdout
    assert "usage: fmnist serve" in out and "--host" in out, out
    assert img.spec["entrypoint"][img.spec["entrypoint"].index("--host") + 1] == "0.0.0.0"  # reachable from outside


def test_the_targets_are_the_ones_fmnist_gcp_build_builds():
    from fmnist_gcp.cloud.build import IMAGE_TARGETS
    assert set(IMAGE_TARGETS) == set(TARGETS) <= set(STAGES)


def test_each_image_installs_one_tensorflow(images):
    assert images["train"].extras == ["cpu", "pipeline"] and images["serve"].extras == ["cpu"]
    assert images["train-gpu"].extras == ["gpu", "pipeline"]
    extras = PROJECT["optional-dependencies"]
    assert [r.split(";")[0] for r in extras["gpu"]] == ["tensorflow[and-cuda]>=2.18"]
    assert all(r.startswith(("tensorflow-cpu", "tensorflow>")) for r in extras["cpu"])
    assert not [r for r in PROJECT["dependencies"] if r.startswith("tensorflow")]  # only through an extra
    assert "fmnist-gcp[cpu,pipeline,pipelines]" in extras["dev"]  # make install and CI: one TensorFlow (cpu), and kfp (issue 21)


def test_gpu_image_runs_the_training_task_like_the_cpu_one(images):
    gpu, cpu = images["train-gpu"], images["train"]
    assert gpu.spec["entrypoint"] == cpu.spec["entrypoint"]
    assert gpu.spec["env"]["NVIDIA_VISIBLE_DEVICES"] == "all" and "compute" in gpu.spec["env"]["NVIDIA_DRIVER_CAPABILITIES"]
    assert "usage: python -m fmnist_gcp.task" in gpu.entrypoint("--help").stdout


SERVE_CHECK = """
import sys, tempfile, importlib.util
import numpy as np
blocked = set(sys.argv[1].split(","))
class NotInImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked: raise ModuleNotFoundError(f"{name} is not in the serving image", name=name)
sys.meta_path.insert(0, NotInImage())
from fmnist_gcp.config import Store
from fmnist_gcp.serving import Predictor, create_app, format_prediction
from fmnist_gcp.training import TrainConfig, build_model, export_model
d = tempfile.mkdtemp()
cfg = TrainConfig(widths=(4,), convs=1, epochs=1, precision="float32", tta_flip=False)
export_model(build_model(cfg, 0.3, 0.3), cfg, {"name": "m"}, Store("models", d))
p = Predictor(d + "/model.keras", "m", "1")
print(format_prediction(p(np.zeros((1, 28, 28)))[0])["displayNames"][:1], create_app(lambda: p).title)
"""


def test_serve_image_serves_without_the_notebook_tooling(images):
    from importlib.metadata import packages_distributions
    img = images["serve"]
    pipeline = {re.split(r"[\[<>=; ]", r)[0].lower() for r in PROJECT["optional-dependencies"]["pipeline"] + ["jupyterlab"]}
    blocked = sorted(m for m, dists in packages_distributions().items()
                     if any(d.lower().replace("_", "-") in pipeline for d in dists) and m.isidentifier())
    assert {"papermill", "nbconvert", "matplotlib", "sklearn", "jupyterlab"} <= set(blocked)
    r = img.run("python", "-c", SERVE_CHECK, ",".join(blocked))
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    out = img.entrypoint("--help").stdout
    assert "usage: fmnist serve" in out


def test_every_image_builds_on_python_slim_unless_the_build_names_another_base():
    # Cloud Build and `docker build` pass no --build-arg: the default is the base the images ship on. `make images`
    # (bench/images.py) overrides BASE with its Debian root; an ARG after a FROM would be invisible to the FROM lines
    assert {STAGES[t]["base"] for t in TARGETS} == {"python:3.11-slim"}
    text = (ROOT / "docker/Dockerfile").read_text()
    assert text.index("ARG BASE=") < text.index("FROM ") and "FROM ${BASE} AS base" in text
    assert parse_dockerfile(text.replace("ARG BASE=python:3.11-slim", "ARG BASE=localhost/b:1"))["serve"]["base"] == "localhost/b:1"
