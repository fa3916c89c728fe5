"""Fuzzing in CI (issue 14): schemathesis against the app in-process (its own OpenAPI spec drives the cases;
every default check, so zero server errors and zero schema violations), and hypothesis property tests of
the request models. Bounded to fit the CI budget: ``FUZZ_EXAMPLES`` cases per operation (default 25;
``SHORTLIST_FUZZ_EXAMPLES`` raises it for a longer run).
"""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from test_recommender import TINY_CONFIG, build_tiny_pipeline

from pipeline.recommender import Recommender
from pipeline.recommender_config import RecommenderConfig, ServiceConfig
from pipeline.service import create_app, request_models

FUZZ_EXAMPLES = int(os.environ.get("SHORTLIST_FUZZ_EXAMPLES", "25"))
CONFIG = TINY_CONFIG
SERVICE = ServiceConfig(max_k=50, max_candidates=30, max_history=40, max_body_bytes=4096, warm_up=False,
                        watch_latest_s=0)
INT64 = (-(2**53 - 1), 2**53 - 1)  # the JSON-safe integers the API publishes and enforces


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory):
    os.environ.pop(SERVICE.api_key_env, None)  # auth off: the cases reach the endpoints
    tiny = build_tiny_pipeline(tmp_path_factory.mktemp("fuzz"))
    rec = Recommender.load(tiny["artifact"], tiny["ranker"], config=RecommenderConfig(**CONFIG))
    app = create_app(rec, SERVICE)
    yield app
    rec.close()


@pytest.fixture(scope="module")
def api_schema(fuzzed_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)


@pytest.fixture(scope="module")
def session(fuzzed_app, api_schema):
    """One in-process client (one lifespan) for every case, ready before the first."""
    from schemathesis.python import asgi

    with asgi.get_client(fuzzed_app) as client:
        deadline = time.monotonic() + 30
        while client.get("http://testserver/readyz").status_code != 200:
            assert time.monotonic() < deadline, fuzzed_app.state.shortlist.status
            time.sleep(0.05)
        yield client


def catalogue_aware_acceptance(ctx, response, case):
    """schemathesis' positive-data check, except for one answer the spec cannot express: a 422 whose every
    error is ``unknown_id`` (a well-formed id outside the served catalogue, which a hot swap may change)."""
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    if response.status_code == 422:
        detail = response.json().get("detail", [])
        if detail and all(error.get("type") == "unknown_id" for error in detail):
            return None
    return positive_data_acceptance(ctx, response, case)


def size_aware_rejection(ctx, response, case):
    """schemathesis' negative-data check, with 413 (a body over max_body_bytes) and 415 (not JSON) counted
    as the rejections they are."""
    from schemathesis.specs.openapi.checks import negative_data_rejection

    if response.status_code in (413, 415):
        return None
    return negative_data_rejection(ctx, response, case)


#: Every operation of the spec (a test below checks the list is complete).
OPERATIONS = [("POST", "/recommend"), ("POST", "/rerank"), ("POST", "/events"), ("GET", "/healthz"),
              ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/users/{user_id}/history"),
              ("GET", "/items/search"), ("POST", "/admin/reload")]
CASES: dict[str, int] = {}


def test_the_fuzzed_operations_are_every_operation_of_the_spec(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


# (schemathesis' own pytest plugin, ``from_fixture``, does not run under pytest 9.2: the cases are drawn
# from each operation's hypothesis strategy here instead, with every default check.)
#: Operations with inputs: they get schema-violating (negative) cases too.
WITH_INPUT = [op for op in OPERATIONS if op[1] not in ("/healthz", "/readyz", "/metrics")]
FUZZED = [(m, p, "positive") for m, p in OPERATIONS] + [(m, p, "negative") for m, p in WITH_INPUT]


@pytest.mark.parametrize("method,path,mode", FUZZED, ids=[f"{mode} {m} {p}" for m, p, mode in FUZZED])
def test_the_api_conforms_to_its_spec(api_schema, session, method, path, mode):
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
    label = f"{mode} {method} {path}"

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    @given(case=strategy)
    def run(case):
        CASES[label] = CASES.get(label, 0) + 1
        case.call_and_validate(session=session, excluded_checks=[positive_data_acceptance, negative_data_rejection],
                               additional_checks=[catalogue_aware_acceptance, size_aware_rejection])

    run()
    assert CASES.get(label, 0) >= 1
    print(f"fuzz {label}: {CASES[label]} cases")  # shown with -s


# ---- hypothesis: the request models -----------------------------------------------------------------
MODELS = request_models(SERVICE)
ids = st.integers(*INT64)
too_big = st.one_of(st.integers(max_value=INT64[0] - 1), st.integers(min_value=INT64[1] + 1))


@given(user=ids, k=st.integers(1, SERVICE.max_k), history=st.none() | st.lists(ids, max_size=SERVICE.max_history))
def test_every_in_range_recommend_request_is_accepted_as_sent(user, k, history):
    body = MODELS["recommend"](user_id=user, k=k, history=history)
    assert body.user_id == user and body.k == k and body.history == history


@given(k=st.integers().filter(lambda v: not 1 <= v <= SERVICE.max_k))
def test_k_outside_its_range_is_refused_naming_k(k):
    with pytest.raises(ValidationError) as info:
        MODELS["recommend"](user_id=1, k=k)
    assert {e["loc"][0] for e in info.value.errors()} == {"k"}


@given(user=too_big)
def test_ids_beyond_the_published_range_are_refused(user):
    for name in ("recommend", "events"):
        with pytest.raises(ValidationError):
            MODELS[name](user_id=user, item_id=1) if name == "events" else MODELS[name](user_id=user)


@given(value=st.one_of(st.text(), st.floats(allow_nan=True).filter(lambda v: not float(v).is_integer()),
                       st.booleans(), st.lists(st.integers(), max_size=3)))
def test_no_other_json_type_passes_as_an_id(value):
    with pytest.raises(ValidationError):
        MODELS["events"](user_id=value, item_id=1)


@given(value=st.integers(-(2**52), 2**52))
def test_a_whole_number_written_as_a_float_is_that_integer(value):
    """JSON Schema counts ``100.0`` as an integer, so the models do too (``100.5`` is refused above)."""
    assert MODELS["events"](user_id=float(value), item_id=1).user_id == value


@given(candidates=st.lists(ids, max_size=SERVICE.max_candidates + 5),
       top_n=st.none() | st.integers(-5, SERVICE.max_candidates + 5))
def test_rerank_requests_are_accepted_exactly_within_their_limits(candidates, top_n):
    ok = 1 <= len(candidates) <= SERVICE.max_candidates and (top_n is None or 1 <= top_n <= SERVICE.max_candidates)
    try:
        MODELS["rerank"](user_id=1, candidates=candidates, top_n=top_n)
    except ValidationError:
        assert not ok
    else:
        assert ok


@given(timestamp=st.integers(min_value=-(2**70), max_value=2**70))
def test_event_timestamps_are_non_negative_and_in_range(timestamp):
    ok = 0 <= timestamp <= INT64[1]
    try:
        MODELS["events"](user_id=1, item_id=1, timestamp=timestamp)
    except ValidationError:
        assert not ok
    else:
        assert ok
