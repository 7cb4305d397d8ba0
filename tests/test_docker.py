"""Docker is not available here: check that the image runs the entry point the tests and the CustomJob use."""
import re

from conftest import ROOT


def stage_lines(target: str) -> list[str]:
    text = (ROOT / "docker/Dockerfile").read_text()
    m = re.search(rf"^FROM \S+ AS {target}\n(.*?)(?=^FROM |\Z)", text, re.S | re.M)
    assert m, f"no stage {target!r} in docker/Dockerfile"
    return [l for l in m.group(1).splitlines() if l.strip() and not l.startswith("#")]


def test_train_image_runs_the_task_module_the_custom_job_names():
    from fmnist_gcp.vertex_training import worker_pool_specs
    entry = [l for l in stage_lines("train") if l.startswith("ENTRYPOINT")]
    assert entry == ['ENTRYPOINT ["python", "-m", "fmnist_gcp.task"]']
    assert worker_pool_specs("img", [])[0]["container_spec"]["command"] == ["python", "-m", "fmnist_gcp.task"]


def test_base_image_installs_the_package_and_imports_the_task():
    base = stage_lines("base")
    assert any(l.startswith("COPY fmnist_gcp") for l in base) and any("pip install ." in l for l in base)
    assert any('import fmnist_gcp.task' in l for l in base)


def test_serve_image_runs_fmnist_serve_on_all_interfaces_with_the_registry_routes():
    from fmnist_gcp.registry import SERVING_ROUTES
    lines = stage_lines("serve")
    assert 'ENTRYPOINT ["fmnist", "serve", "--host", "0.0.0.0"]' in lines
    assert f"EXPOSE {SERVING_ROUTES['port']}" in lines


def test_serve_reads_the_model_from_aip_storage_uri(monkeypatch, tmp_path):
    from fmnist_gcp.serving import model_source
    monkeypatch.setenv("AIP_STORAGE_URI", "gs://bucket/model/")
    assert model_source() == ("gs://bucket/model/model.keras", "fmnist-cnn", "vertex")
