"""API fuzzing of `samadapt serve` with Schemathesis against its own OpenAPI schema.

A real uvicorn server on 127.0.0.1 (background thread, free port, the tiny core and one adapter);
Schemathesis generates requests for every operation in /openapi.json, the multipart upload
included, both valid ones and ones that break the schema. The property, per request:

- no 500 (`not_a_server_error`);
- the status code is one the schema declares for the operation, with the declared content type,
  headers and body schema (`status_code_conformance`, `content_type_conformance`,
  `response_headers_conformance`, `response_schema_conformance`);
- requests that break the schema are refused with a 4xx (`negative_data_rejection`).

Half the valid segment/auto bodies get the id of an image the server holds, so the model
really runs under fuzzed prompts and settings (not only the 404 for unknown ids). Afterwards the
server is still healthy and still answers a known request exactly as before. Bounded: a fixed
number of examples per operation, a few seconds each on one core.
"""
import itertools

import pytest

schemathesis = pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_serve import make_core_and_adapters, png_bytes, scene  # noqa: E402

from samadapt.recipes.model import load_base  # noqa: E402
from samadapt.recipes.serve import background_server, create_app  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
EXAMPLES = 80  # per operation and mode: about 15 s for all on one core
GOOD = {"points": [[10, 12, 1]], "box": [2, 2, 30, 28], "format": "rle"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt, folder = make_core_and_adapters(tmp_path_factory.mktemp("fuzz"), names=("seg_a",))
    # a small auto budget: 32 x 32 px allows 16 points per side, so fuzzed densities mostly get the 422
    app = create_app(load_base(str(ckpt)), folder, max_upload_bytes=100_000, max_pixels=200_000,
                     auto_budget=2**18, request_timeout=20)
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("api/images", files={"file": ("x.png", png_bytes(scene(32, 32, seed=9)), "image/png")})
        assert r.status_code == 200, r.text
        image_id = r.json()["image_id"]
        before = http.post("api/segment", json=dict(GOOD, image_id=image_id, adapter="seg_a")).json()
        yield {"url": url, "http": http, "image_id": image_id, "before": before, "turn": itertools.count()}
        # after all the fuzzing: healthy, and the same request gives the same masks
        health = http.get("api/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["work"]["running"] == 0
        r = http.post("api/images", files={"file": ("x.png", png_bytes(scene(32, 32, seed=9)), "image/png")})
        assert r.status_code == 200 and r.json()["image_id"] == image_id
        after = http.post("api/segment", json=dict(GOOD, image_id=image_id, adapter="seg_a")).json()
        assert {k: v for k, v in after.items() if k != "elapsed_ms"} == {
            k: v for k, v in before.items() if k != "elapsed_ms"}


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server["url"] + "openapi.json")


OPERATIONS = [("GET", "/api/health"), ("GET", "/api/adapters"), ("POST", "/api/images"), ("POST", "/api/segment"),
              ("POST", "/api/auto")]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


def test_the_fuzzed_operations_are_all_of_them(api_schema):
    ops = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert ops == set(OPERATIONS)


# the GET operations take no input, so there is nothing for a negative case to break
RUNS = [(m, p, mode) for m, p in OPERATIONS for mode in MODES if m == "POST" or mode is GenerationMode.POSITIVE]


@pytest.mark.parametrize("method,path,mode", RUNS, ids=[f"{m} {p} {mode.value}" for m, p, mode in RUNS])
def test_no_request_gets_a_500_and_every_answer_matches_the_schema(api_schema, server, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        body = case.body
        # a negative case's broken part may be its image_id: only valid bodies get the real one
        turn = next(server["turn"])
        if mode is GenerationMode.POSITIVE and isinstance(body, dict) and turn % 2 == 0:
            body["image_id"] = server["image_id"]  # the model runs on these ...
            body["adapter"] = (None, "seg_a", body.get("adapter"))[turn % 3]  # ... mostly under a real adapter
            ran.append(case)
        case.call_and_validate(base_url=server["url"].rstrip("/"), checks=CHECKS, timeout=60)

    ran = []
    fuzz()
    if mode is GenerationMode.POSITIVE and method == "POST" and path != "/api/images":
        assert len(ran) >= EXAMPLES // 4, len(ran)  # the model really ran under fuzzed requests
