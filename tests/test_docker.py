"""The images, checked by what they do, without Docker (it cannot run here).

Each image's build is replayed from docker/Dockerfile: the files its COPY lines name, and only those, go into a
scratch build context; its RUN commands run there; its ENTRYPOINT runs with `--help` in a bare environment (the
Dockerfile's ENV, nothing of ours) that imports the package from the context, not from this checkout.

`pip install .` is the one step not run as written: the venv's setuptools (65) cannot build this pyproject.toml
(a PEP 639 license string) and offline it cannot fetch a newer one, as the image's pip does. So the replay checks
what that build needs from the context (the readme, the package, the version attribute) and puts the copied
package on PYTHONPATH, and a console script runs as pip's wrapper runs it: the `[project.scripts]` entry of the
copied pyproject.toml.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT


def parse_dockerfile(text: str) -> dict[str, dict]:
    "Stages by name: env, workdir, copies [(sources, dest)], runs, expose, entrypoint (a stage inherits its FROM stage)."
    stages, cur = {}, None
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"): continue
        op, _, arg = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            image, _, name = arg.partition(" AS ")
            parent = stages.get(image.strip(), {"env": {}, "workdir": "/", "copies": [], "runs": [], "expose": [], "entrypoint": None})
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
        self.env = {"PATH": os.environ["PATH"], "HOME": str(root), **self.spec["env"], "PYTHONPATH": str(root)}
        for cmd in (c.strip() for r in self.spec["runs"] for c in r.split("&&")):
            if cmd == "pip install .": self.check_installable()
            else: self.run(*shlex.split(cmd))

    def check_installable(self) -> None:
        "What building the package from the context needs: the pyproject's readme, package and version attribute."
        proj = tomllib.loads((self.root / "pyproject.toml").read_text())
        assert (self.root / proj["project"]["readme"]).exists(), "COPY misses the readme pyproject.toml names"
        for pkg in proj["tool"]["setuptools"]["packages"]["find"]["include"]:
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
    return {s: Image(s, root / s) for s in ("train", "serve")}


def test_build_context_holds_only_what_copy_names_and_imports_from_there(images):
    img = images["train"]
    assert sorted(p.name for p in img.root.iterdir()) == ["README.md", "fmnist_gcp", "pyproject.toml"]
    where = img.run("python", "-c", "import fmnist_gcp.task; print(fmnist_gcp.task.__file__)").stdout.strip()
    assert where.startswith(str(img.root)), f"the replay imported {where}, not the build context's package"


def test_train_image_runs_the_task_module_the_custom_job_names(images):
    from fmnist_gcp.vertex_training import worker_pool_specs
    img = images["train"]
    assert img.spec["entrypoint"] == worker_pool_specs("img", [])[0]["container_spec"]["command"]
    out = img.entrypoint("--help").stdout
    assert "usage: python -m fmnist_gcp.task" in out and "--model-dir" in out, out


def test_serve_image_runs_fmnist_serve_on_all_interfaces_on_the_serving_port(images):
    from fmnist_gcp.serving import SERVING_CONTRACT
    img = images["serve"]
    assert img.spec["expose"] == [SERVING_CONTRACT.port]
    out = img.entrypoint("--help").stdout
    assert "usage: fmnist serve" in out and "--host" in out, out
    assert img.spec["entrypoint"][img.spec["entrypoint"].index("--host") + 1] == "0.0.0.0"  # reachable from outside
