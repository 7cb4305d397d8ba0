"""bench/images.py (`make images`) without building anything: its errors, and the routes it gives the serve image.

The build and run themselves need root, buildah and about half an hour, so they stay out of `make test`; these
checks hold what the script promises on failure and what it tells the server against the real SDK.
"""
import importlib.util
import re
import sys

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_images", ROOT / "bench/images.py")
images = importlib.util.module_from_spec(spec); spec.loader.exec_module(images)


def test_a_failed_step_names_itself_the_command_and_the_end_of_its_output():
    script = "for i in $(seq 1 40); do echo line$i; done; exit 3"
    with pytest.raises(images.StepFailed) as e:
        images.sh("build serve", ["sh", "-c", script])
    msg = str(e.value)
    assert msg.startswith("step 'build serve' failed: exit status 3") and f"command: sh -c '{script}'" in msg
    assert "line40" in msg and "line16" in msg and "line15\n" not in msg  # the last 25 lines, not the whole output


def test_a_missing_tool_says_how_to_install_it():
    with pytest.raises(images.StepFailed, match=r"no-such-tool-xyz is not installed \(as root: apt-get install -y mmdebstrap buildah\)"):
        images.sh("base: mmdebstrap", ["no-such-tool-xyz", "--version"])


def test_a_step_that_hangs_is_stopped_and_named():
    with pytest.raises(images.StepFailed, match=r"step 'serve' failed: no answer after 1 s"):
        images.sh("serve", [sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)


def test_the_predict_route_is_the_path_the_sdk_rest_client_posts_to():
    # the serve image gets AIP_PREDICT_ROUTE = this path; Vertex's REST transport builds its URL from the http rule
    from google.cloud.aiplatform_v1.services.prediction_service.transports.rest_base import _BasePredictionServiceRestTransport
    rule = _BasePredictionServiceRestTransport._BasePredict._get_http_options()[0]
    assert rule["method"] == "post"
    pattern = re.escape(rule["uri"].replace("{endpoint=", "").replace("}", "")).replace(r"\*", "[^/]+")
    route = images.PREDICT_ROUTE.format(**images.ENDPOINT)
    assert re.fullmatch(pattern, route), (pattern, route)

