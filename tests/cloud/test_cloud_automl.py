"""Vertex AutoML (dataset create and import, the training pipeline, the model's evaluation) and the tuning job: the real
SDK on its REST transport against the fake Vertex REST service (tests/vertex_fake.py), the HTTP requests it sent checked,
known-bad requests refused as Vertex refuses them; and the resumable PNG upload against the GCS emulator."""
import re
import secrets
from unittest import mock

import numpy as np
import pytest

from conftest import VERTEX_ENV
from fmnist_gcp.config import Settings, Store
from fmnist_gcp.preprocessing import AUTOML_CSV_PATH, AUTOML_LABELS, ML_USE, PNG_DIR, png_bytes
from vertex_fake import AUTOML_IMAGE_CLASSIFICATION, LOC, automl_image_evaluation

CSV = "gs://acme-ml-fmnist-datasets/exports/automl/import.csv"


@pytest.fixture
def vertex(vertex_rest, monkeypatch):
    "Vertex settings pointed at the fake Vertex REST service; the SDK's pipeline and job polls do not sleep."
    from google.cloud.aiplatform import jobs, training_jobs
    monkeypatch.setattr(training_jobs, "_JOB_WAIT_TIME", 0); monkeypatch.setattr(jobs, "_JOB_WAIT_TIME", 0)
    return Settings.from_env(vertex_rest.env)


def client(fake, name):
    "The v1 gapic client `name` on the REST transport, pointed at the fake as the package points its own."
    from google.cloud import aiplatform_v1
    from fmnist_gcp.cloud.vertex import vertex_client_options
    return getattr(aiplatform_v1, name)(transport="rest", client_options=vertex_client_options(Settings.from_env(fake.env)))


def shape(fake, start=0):
    "The requests from `start` on as (method, path after the location, resource ids and operation numbers as N)."
    return [(r.method, re.sub(r"/\d+", "/N", r.path.split(LOC, 1)[-1])) for r in fake.requests[start:]]


def test_dataset_is_created_and_imported_with_the_single_label_schema(vertex, vertex_rest):
    from google.cloud import aiplatform
    from fmnist_gcp.cloud.automl import VERTEX_AUTOML_MODEL, create_image_dataset
    fake = vertex_rest
    ds = create_image_dataset(vertex, CSV)
    (create,) = fake.calls("POST", f"/v1/{LOC}/datasets")
    assert create.body["displayName"] == VERTEX_AUTOML_MODEL and create.body["labels"]["app"] == "fmnist-gcp"
    assert create.body["metadataSchemaUri"] == aiplatform.schema.dataset.metadata.image
    (imp,) = fake.calls("POST", "*:import")
    assert imp.path == f"/v1/{ds.resource_name}:import"
    assert imp.body == {"importConfigs": [{"gcsSource": {"uris": [CSV]},
                                           "importSchemaUri": aiplatform.schema.dataset.ioformat.image.single_label_classification}]}
    assert ds.resource_name in fake.datasets  # the dataset the create made, not one the SDK invented
    # both long-running operations polled until done, the import only after the dataset exists
    assert [r for r in shape(fake) if r != ("GET", "/datasets/N")] == [
        ("POST", "/datasets"), *[("GET", "/datasets/N/operations/N")] * 2,
        ("POST", "/datasets/N:import"), *[("GET", "/datasets/N/operations/N")] * 2]


def test_dataset_requests_vertex_refuses_are_refused(vertex_rest):
    from google.api_core.exceptions import BadRequest, NotFound
    from google.cloud import aiplatform
    fake, c = vertex_rest, client(vertex_rest, "DatasetServiceClient")
    with pytest.raises(BadRequest, match="dataset.metadata_schema_uri; Message: Required field is not set"):
        c.create_dataset(parent=LOC, dataset={"display_name": "d"})
    name = c.create_dataset(parent=LOC, dataset={"display_name": "d", "metadata_schema_uri": aiplatform.schema.dataset.metadata.image,
                                                 "metadata": {}}).result().name
    single = aiplatform.schema.dataset.ioformat.image.single_label_classification
    with pytest.raises(BadRequest, match="import_configs; Message: Required field is not set"):
        c.import_data(name=name, import_configs=[])
    with pytest.raises(BadRequest, match=r"import_configs\[0\].import_schema_uri; Message: Required field is not set"):
        c.import_data(name=name, import_configs=[{"gcs_source": {"uris": [CSV]}}])
    with pytest.raises(BadRequest, match=r"import_configs\[0\].gcs_source.uris; Message: Required field is not set"):
        c.import_data(name=name, import_configs=[{"gcs_source": {}, "import_schema_uri": single}])
    with pytest.raises(BadRequest, match="must be gs:// URIs"):
        c.import_data(name=name, import_configs=[{"gcs_source": {"uris": ["/home/me/import.csv"]}, "import_schema_uri": single}])
    with pytest.raises(BadRequest, match="does not fit a dataset"):
        c.import_data(name=name, import_configs=[{"gcs_source": {"uris": [CSV]}, "import_schema_uri": aiplatform.schema.dataset.ioformat.text.single_label_classification}])
    with pytest.raises(NotFound):
        c.import_data(name=f"{LOC}/datasets/404", import_configs=[{"gcs_source": {"uris": [CSV]}, "import_schema_uri": single}]).result()
    assert "imports" not in fake.datasets[name]  # nothing refused was imported


def test_automl_training_uses_the_csv_splits_and_the_budget(vertex, vertex_rest):
    from google.cloud import aiplatform
    from fmnist_gcp.cloud.automl import VERTEX_AUTOML_MODEL, create_image_dataset, train_automl
    fake = vertex_rest
    ds = create_image_dataset(vertex, CSV)
    start = len(fake.requests)
    model = train_automl(vertex, ds, budget_milli_node_hours=16_000, display_name="fmnist-automl-test")
    (req,) = fake.calls("POST", f"/v1/{LOC}/trainingPipelines")
    tp = req.body
    assert tp["displayName"] == "fmnist-automl-test" and tp["labels"]["app"] == "fmnist-gcp"
    assert tp["trainingTaskDefinition"] == aiplatform.schema.training_job.definition.automl_image_classification
    inputs = tp["trainingTaskInputs"]
    assert inputs["modelType"] == "CLOUD" and inputs["budgetMilliNodeHours"] == 16_000 and inputs["multiLabel"] is False
    cfg = tp["inputDataConfig"]
    assert cfg["datasetId"] == ds.name
    assert (cfg["filterSplit"]["trainingFilter"], cfg["filterSplit"]["validationFilter"], cfg["filterSplit"]["testFilter"]) == tuple(
        f"labels.aiplatform.googleapis.com/ml_use={ML_USE[s]}" for s in ("train", "val", "test"))
    assert tp["modelToUpload"]["displayName"] == VERTEX_AUTOML_MODEL and tp["modelToUpload"]["labels"]["app"] == "fmnist-gcp"
    # followed through queued, pending and running to succeeded, then the model the pipeline uploaded is read
    (pipeline,) = fake.pipelines.values()
    assert pipeline["state"] == "PIPELINE_STATE_SUCCEEDED" and len(fake.calls("GET", f"/v1/{pipeline['name']}")) >= 3
    assert model.resource_name == pipeline["modelToUpload"]["name"] and model.display_name == VERTEX_AUTOML_MODEL
    assert shape(fake, start)[0] == ("POST", "/trainingPipelines") and shape(fake)[-1] == ("GET", "/models/N@1")
    for bad in (500, 7_999, 800_001):
        with pytest.raises(ValueError, match=r"8,000\.\.800,000 milli node hours \(8 to 800 node hours\)"):
            train_automl(vertex, ds, budget_milli_node_hours=bad)
    assert len(fake.calls("POST", "*/trainingPipelines")) == 1  # refused before anything was sent


def test_training_pipeline_requests_vertex_refuses_are_refused(vertex, vertex_rest):
    "What Vertex refuses, sent past the package's own checks: the budget outside 8,000..800,000, required fields, no dataset."
    from google.api_core.exceptions import BadRequest, NotFound
    from fmnist_gcp.cloud.automl import create_image_dataset
    from google.protobuf import json_format, struct_pb2
    fake, c = vertex_rest, client(vertex_rest, "PipelineServiceClient")
    ds = create_image_dataset(vertex, CSV)
    def pipeline(budget=8_000, dataset=ds.name, **over):
        inputs = json_format.ParseDict({"modelType": "CLOUD", "multiLabel": False, "budgetMilliNodeHours": budget}, struct_pb2.Value())
        return {"display_name": "p", "training_task_definition": AUTOML_IMAGE_CLASSIFICATION, "training_task_inputs": inputs,
                "input_data_config": {"dataset_id": dataset}, "model_to_upload": {"display_name": "m"}, **over}
    for budget in (7_999, 800_001):
        with pytest.raises(BadRequest, match="budget_milli_node_hours must be between 8000 and 800000"):
            c.create_training_pipeline(parent=LOC, training_pipeline=pipeline(budget))
    with pytest.raises(BadRequest, match="training_pipeline.training_task_definition; Message: Required field is not set"):
        c.create_training_pipeline(parent=LOC, training_pipeline=pipeline(training_task_definition=""))
    with pytest.raises(BadRequest, match="training_pipeline.model_to_upload.display_name; Message: Required field is not set"):
        c.create_training_pipeline(parent=LOC, training_pipeline=pipeline(model_to_upload={}))
    with pytest.raises(NotFound):
        c.create_training_pipeline(parent=LOC, training_pipeline=pipeline(dataset="404"))
    assert fake.pipelines == {}
    ok = c.create_training_pipeline(parent=LOC, training_pipeline=pipeline(800_000))
    assert ok.state.name == "PIPELINE_STATE_QUEUED"  # not done when created
    assert c.get_training_pipeline(name=ok.name).state.name == "PIPELINE_STATE_PENDING"


def test_budget_texts_state_8000_milli_node_hours_as_8_node_hours():
    "No text calls 8,000 milli node hours one node hour: it is 8, the minimum for image classification."
    import json, pathlib, re
    root = pathlib.Path(__file__).parents[2]
    texts = {p: "".join("".join(c["source"]) for c in json.loads(p.read_text())["cells"]) for p in (root / "nbs").glob("*.ipynb")}
    texts |= {p: p.read_text() for p in (root / "fmnist_gcp").rglob("*.py")}
    wrong = [str(p.relative_to(root)) for p, t in texts.items()
             if re.search(r"(8,?000\D{0,20}(one|1) node hour)|(1 to 100 node hours)", t, re.I)]
    assert wrong == []


@pytest.fixture(scope="module")
def real_predictions():
    "Probabilities of a logistic regression trained on 1,500 training images, on 1,000 test images."
    import warnings
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from fmnist_gcp.data import load_split
    x, y = load_split("train", limit=1500); xt, yt = load_split("test", limit=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a few iterations make a fair, imperfect model
        clf = LogisticRegression(max_iter=50).fit(x.reshape(len(x), -1) / 255.0, y)
    return yt, clf.predict_proba(xt.reshape(len(xt), -1) / 255.0)


def test_evaluation_is_fetched_and_parsed_into_our_figures(vertex, vertex_rest, real_predictions, tmp_path):
    "Vertex's evaluation of the AutoML model, in the shape Vertex returns for image classification, read into our figures."
    from fmnist_gcp.automl import read_vertex_evaluation
    from fmnist_gcp.evaluation import classification_metrics, confusion
    from fmnist_gcp.cloud.automl import create_image_dataset, fetch_evaluation, save_vertex_evaluation, train_automl
    fake, (y, p) = vertex_rest, real_predictions
    fake.automl_metrics = automl_image_evaluation(y, p, AUTOML_LABELS, seed=5)  # what Vertex reports for these predictions
    model = train_automl(vertex, create_image_dataset(vertex, CSV)).resource_name
    ev = fetch_evaluation(vertex, model)
    (asked,) = fake.calls("GET", "*/evaluations")
    assert asked.path == f"/v1/{model}/evaluations"  # what we sent: ListModelEvaluations of this model
    assert ev["metrics_schema_uri"].endswith("/modelevaluation/classification_metrics_1.0.0.yaml")
    assert "auRoc" not in ev["metrics"]  # an image classification evaluation has none
    local = Settings.from_env({"FMNIST_HOME": str(tmp_path)})
    save_vertex_evaluation(local, model, ev)
    stored = read_vertex_evaluation(local)
    parsed, ours = stored["metrics"], classification_metrics(y, p)
    assert stored["model"] == model and stored["evaluation"].startswith(f"{model}/evaluations/")
    # our area under Vertex's confidence-threshold curve (its threshold-0 entry has no confidenceThreshold), against
    # our own au_prc from the predictions themselves
    assert parsed["au_prc_from_curve"] == pytest.approx(ours["au_prc"], abs=1e-5)
    assert parsed["au_prc"] == pytest.approx(ours["micro_ap"], abs=1e-6) and parsed["log_loss"] == pytest.approx(ours["log_loss"], rel=1e-6)
    assert parsed["micro_roc_auc"] is None
    # the confusion matrix comes in Vertex's class order with its own ids: back in ours, counts as ints
    assert parsed["accuracy"] == pytest.approx(ours["accuracy"]) and parsed["n"] == len(y)
    assert parsed["confusion"] == confusion(y, p.argmax(1)).tolist()


def test_tuning_job_runs_the_training_container_over_the_local_search_space(vertex, vertex_rest):
    from fmnist_gcp.automl import search_space
    from fmnist_gcp.task import task_parser
    from google.cloud.aiplatform_v1.types.study import StudySpec
    from fmnist_gcp.cloud.automl import submit_tuning_job
    fake = vertex_rest
    space = search_space("16,32|32,64,128", "64,128")
    job = submit_tuning_job(vertex, "europe-docker.pkg.dev/acme-ml/fmnist/train:1", space, max_trial_count=12,
                            parallel_trial_count=3, display_name="fmnist-tune-test", log=lambda *a: None)
    job.wait()
    (sent,) = fake.calls("POST", f"/v1/{LOC}/hyperparameterTuningJobs")
    req = sent.body
    assert req["displayName"] == "fmnist-tune-test" and req["labels"]["app"] == "fmnist-gcp"
    assert (req["maxTrialCount"], req["parallelTrialCount"]) == (12, 3)
    study = req["studySpec"]  # the REST transport sends enums as their numbers
    assert study["metrics"] == [{"metricId": "val_accuracy", "goal": StudySpec.MetricSpec.GoalType.MAXIMIZE.value}]
    assert study["measurementSelectionType"] == StudySpec.MeasurementSelectionType.LAST_MEASUREMENT.value
    flags = {o for a in task_parser()._actions for o in a.option_strings}
    params = {p["parameterId"]: p for p in study["parameters"]}
    assert list(params) == [p.name for p in space if f"--{p.name}" in flags]  # what the task can take, in space order
    assert params["widths"]["categoricalValueSpec"]["values"] == ["16,32", "32,64,128"]
    assert params["batch_size"]["discreteValueSpec"]["values"] == [64.0, 128.0]  # numbers: trials get "--batch_size=128.0"
    lr = params["lr"]
    assert (lr["doubleValueSpec"], lr["scaleType"]) == ({"minValue": 1e-3, "maxValue": 1.5e-2},
                                                       StudySpec.ParameterSpec.ScaleType.UNIT_LOG_SCALE.value)
    assert params["convs"]["integerValueSpec"] == {"minValue": "1", "maxValue": "3"}  # int64: a JSON string
    (pool,) = req["trialJobSpec"]["workerPoolSpecs"]
    c = pool["containerSpec"]
    assert c["imageUri"] == "europe-docker.pkg.dev/acme-ml/fmnist/train:1" and c["command"] == ["python", "-m", "fmnist_gcp.task"]
    assert c["args"][:2] == ["--epochs", "3"] and "--datasets-uri" in c["args"]
    assert req["trialJobSpec"]["serviceAccount"] == VERTEX_ENV["FMNIST_SERVICE_ACCOUNT"]
    # followed in the SDK's thread through queued, pending and running to succeeded
    (name,) = fake.jobs
    assert job.resource_name == name and fake.jobs[name]["state"] == "JOB_STATE_SUCCEEDED"
    assert len(fake.calls("GET", f"/v1/{name}")) >= 3 and job.state.name == "JOB_STATE_SUCCEEDED"


def test_tuning_job_requests_vertex_refuses_are_refused(vertex_rest):
    from google.api_core.exceptions import BadRequest
    fake, c = vertex_rest, client(vertex_rest, "JobServiceClient")
    pool = {"machine_spec": {"machine_type": "n1-standard-8"}, "replica_count": 1, "container_spec": {"image_uri": "img:1"}}
    def job(**over):
        return {"display_name": "t", "max_trial_count": 4, "parallel_trial_count": 2, "trial_job_spec": {"worker_pool_specs": [pool]},
                "study_spec": {"metrics": [{"metric_id": "val_accuracy", "goal": "MAXIMIZE"}],
                               "parameters": [{"parameter_id": "lr", "double_value_spec": {"min_value": 1e-3, "max_value": 1e-2}}]},
                **over}
    create = lambda **over: c.create_hyperparameter_tuning_job(parent=LOC, hyperparameter_tuning_job=job(**over))
    for field, over in (("max_trial_count", {"max_trial_count": 0}), ("trial_job_spec", {"trial_job_spec": {}}),
                        ("study_spec.metrics", {"study_spec": {"parameters": job()["study_spec"]["parameters"]}}),
                        ("study_spec.parameters", {"study_spec": {"metrics": job()["study_spec"]["metrics"]}})):
        with pytest.raises(BadRequest, match=rf"hyperparameter_tuning_job\.{field}; Message: Required field is not set"):
            create(**over)
    with pytest.raises(BadRequest, match=r"parameters\[0\] \(lr\): exactly one parameter value spec"):
        create(study_spec={**job()["study_spec"], "parameters": [{"parameter_id": "lr"}]})
    with pytest.raises(BadRequest, match="min_value must be less than max_value"):
        create(study_spec={**job()["study_spec"], "parameters": [{"parameter_id": "lr", "double_value_spec": {"min_value": 0.1, "max_value": 0.01}}]})
    with pytest.raises(BadRequest, match="parallel_trial_count \\(5\\) must not exceed max_trial_count"):
        create(parallel_trial_count=5)
    with pytest.raises(BadRequest, match=r"worker_pool_specs\[0\].container_spec.image_uri; Message: Required field is not set"):
        create(trial_job_spec={"worker_pool_specs": [{**pool, "container_spec": {}}]})
    assert fake.jobs == {}
    made = create()
    assert made.state.name == "JOB_STATE_QUEUED"  # not done when created
    assert c.get_hyperparameter_tuning_job(name=made.name).state.name == "JOB_STATE_PENDING"


def test_upload_to_the_bucket_skips_objects_already_there(gcs_emulator, monkeypatch, tmp_path):
    from fmnist_gcp.cloud.automl import stored_md5, upload_automl_export
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator); monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    src, dest = Store("datasets", str(tmp_path / "datasets")), Store("datasets", f"gs://fmnist-test/automl-{secrets.token_hex(4)}")
    imgs = np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    splits = ["train"] * 20 + ["val"] * 5 + ["test"] * 5
    rels = [f"{PNG_DIR}/{s}/{AUTOML_LABELS[i % 10]}/{s}_{i:05d}.png" for i, s in enumerate(splits)]
    for r, im in zip(rels, imgs): src.write_bytes(r, png_bytes(im))
    src.write_text(AUTOML_CSV_PATH, "".join(f"{ML_USE[s]},{src.uri(r)},{AUTOML_LABELS[i % 10]}\n" for i, (s, r) in enumerate(zip(splits, rels))))
    first = upload_automl_export(src, dest, workers=4, batch=7, log=lambda *a: None)
    assert (first["files"], first["uploaded"], first["skipped"]) == (30, 30, 0)
    assert first["csv"] == dest.uri(AUTOML_CSV_PATH)
    rows = dest.read_text(AUTOML_CSV_PATH).splitlines()
    assert rows[0] == f"training,{dest.uri(rels[0])},{AUTOML_LABELS[0]}" and all(r.split(",")[1].startswith("gs://") for r in rows)
    assert dest.read_bytes(rels[29]) == src.read_bytes(rels[29]) and len(stored_md5(dest, PNG_DIR)) == 30
    from fmnist_gcp.config import filesystem
    fs, sends = filesystem(dest.root)[0], []  # fsspec hands every caller this one cached instance
    real_pipe = fs.pipe
    def counting_pipe(batch, *a, **k):
        sends.append(sorted(batch)); return real_pipe(batch, *a, **k)
    with mock.patch.object(fs, "pipe", counting_pipe):
        again = upload_automl_export(src, dest, log=lambda *a: None)
        assert (again["uploaded"], again["skipped"], sends) == (0, 30, [])  # everything there: nothing sent
        src.write_bytes(rels[3], png_bytes(255 - imgs[3]))  # one image changed since
        third = upload_automl_export(src, dest, log=lambda *a: None)
    assert (third["uploaded"], third["skipped"]) == (1, 29) and len(sends) == 1 and sends[0][0].endswith(rels[3])
    assert dest.read_bytes(rels[3]) == png_bytes(255 - imgs[3])



def vertex_trial_args(spec: dict) -> list[tuple[str, str, str]]:
    "(parameter id, value kind, `--id=value` string) of values Vertex gives trials, each kind spelt as Vertex spells it."
    out = []
    for pid, s in spec.items():
        p = s._to_parameter_spec(pid)
        kind = p._pb.WhichOneof("parameter_value_spec")
        if kind == "double_value_spec":  # a double: its shortest repr, e.g. 0.0031622776601683794
            lo, hi = p.double_value_spec.min_value, p.double_value_spec.max_value
            vals = [lo, (lo * hi) ** 0.5, hi]
        elif kind == "integer_value_spec": vals = sorted({p.integer_value_spec.min_value, p.integer_value_spec.max_value})
        elif kind == "discrete_value_spec": vals = list(p.discrete_value_spec.values)  # floats, sent as 128.0
        else: vals = list(p.categorical_value_spec.values)
        out += [(pid, kind, f"--{pid}={v!r}" if isinstance(v, float) else f"--{pid}={v}") for v in vals]
    return out


def test_task_parses_every_value_vertex_sends_for_the_real_search_space():
    from fmnist_gcp.automl import search_space
    from fmnist_gcp.cloud.automl import vertex_parameter_spec
    from fmnist_gcp.task import task_parser
    args = vertex_trial_args(vertex_parameter_spec(search_space(), log=lambda *a: None))
    assert {k for _, k, _ in args} == {"double_value_spec", "integer_value_spec", "discrete_value_spec", "categorical_value_spec"}
    assert "--batch_size=128.0" in [a for *_, a in args] and "--convs=1" in [a for *_, a in args]
    for pid, kind, a in args:
        value, got = a.split("=", 1)[1], getattr(task_parser().parse_args([a]), pid)
        if kind == "categorical_value_spec": assert got == tuple(int(w) for w in value.split(",")), a
        elif kind == "double_value_spec": assert type(got) is float and got == float(value), a
        else: assert type(got) is int and got == float(value), a  # integer and discrete: the task's int flags


def test_task_refuses_a_fractional_value_for_an_integer_flag(capsys):
    from fmnist_gcp.task import task_parser
    with pytest.raises(SystemExit) as e: task_parser().parse_args(["--batch_size=128.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--batch-size/--batch_size: 128.5 is not a whole number" in err, err


def test_tuning_trials_get_the_private_endpoint_and_transport_when_set(vertex, vertex_rest):
    from fmnist_gcp.automl import search_space
    from fmnist_gcp.cloud.automl import submit_tuning_job
    submit_tuning_job(vertex, "img:1", search_space(), display_name="t", log=lambda *a: None)
    (sent,) = vertex_rest.calls("POST", "*/hyperparameterTuningJobs")
    (pool,) = sent.body["trialJobSpec"]["workerPoolSpecs"]
    env = {e["name"]: e["value"] for e in pool["containerSpec"]["env"]}
    assert (env["FMNIST_VERTEX_ENDPOINT"], env["FMNIST_VERTEX_TRANSPORT"]) == (vertex_rest.host, "rest")
