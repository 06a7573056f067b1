"""tenfold.integration without a Ray cluster: app arguments, the autoscaling policy, the HTTP codecs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from support import ROOT

from tenfold.integration import codec
from tenfold.integration.config import AppArgs
from tenfold.integration.policy import (
    INTERPRETERS,
    QUEUE_DEPTH,
    UTILIZATION,
    UtilizationPolicy,
    desired_replicas,
    utilization_policy,
)
from tenfold.packaging import TensorSpec

SPECS = [
    TensorSpec(name="x", dtype="float32", shape=[None, 4]),
    TensorSpec(name="k", dtype="int64", shape=[None]),
]

# -- app arguments ---------------------------------------------------------------------------------


def test_interpreters_default_to_num_cpus_and_num_cpus_to_interpreters() -> None:
    assert AppArgs(archive="m.pt").replica_interpreters == 2
    assert AppArgs(archive="m.pt", num_cpus=3).replica_interpreters == 3
    assert AppArgs(archive="m.pt", num_cpus=0.25).replica_interpreters == 1
    assert AppArgs(archive="m.pt", interpreters=3).replica_num_cpus == 3.0
    assert AppArgs(archive="m.pt", interpreters=2).replica_max_ongoing_requests == 8


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sha256": "abc"}, "sha256 must be 64 hex digits"),
        ({"require_sha256": True}, "require_sha256 is set but no sha256 is pinned"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas (2) must be >= min_replicas (3)"),
        ({"autoscaling": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 3}}, "initial_replicas (3)"),
        ({"autoscaling": {"target_utilization": 1.5}}, "target_utilization"),
        ({"autoscaling": {}, "num_replicas": 2}, "either num_replicas or autoscaling"),
        ({"batch_wait_timeout_s": 0.1}, "batch_wait_timeout_s needs max_batch_size"),
        ({"interpreters": 0}, "interpreters"),
        ({"interpreters": 16}, "interpreters must be at most 15 per replica (glibc allows 16 link-map namespaces"),
        ({"num_cpus": 16}, "num_cpus 16 would give a replica 16 interpreters; set interpreters (at most 15)"),
        ({"http_port": 70000}, "http_port"),
        ({"http_port": 8100, "graceful_shutdown_timeout_s": 5}, "http_drain_timeout_s (10) must not exceed "
                                                                  "graceful_shutdown_timeout_s (5)"),
        ({"resources": {"model-node": 0}}, "resources.model-node"),
        ({"max_queued_requests": 0}, "max_queued_requests must be -1 (no limit) or at least 1"),
        ({"request_timeout_s": -1}, "request_timeout_s"),
        ({"max_request_bytes": 0}, "max_request_bytes"),
        ({"intepreters": 2}, "intepreters"),
    ],
)
def test_bad_app_arguments_are_refused_with_the_rule(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        AppArgs(archive="m.pt", **fields)
    assert message in str(info.value)


def test_several_archives_take_a_pin_each_and_names_that_fit_a_url_path() -> None:
    args = AppArgs(archives={"embedder": "build/e.pt", "search": {"archive": "s3://m/s.pt", "sha256": "A" * 64}},
                   max_models_per_replica=1)
    assert args.serves_several and set(args.archive_refs) == {"embedder", "search"}
    assert args.archive_refs["embedder"].archive == "build/e.pt" and args.archive_refs["search"].sha256 == "a" * 64
    assert set(AppArgs(archive="m.pt").archive_refs) == {""}  # the one archive, served at /


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "give either archive (one model) or archives (several, by name), not neither"),
        ({"archive": "m.pt", "archives": {"a": "a.pt"}}, "not both"),
        ({"archives": {}}, "archives names no archive"),
        ({"archives": {"-/manifest": "a.pt"}}, "cannot be a segment of a URL path"),
        ({"archives": {"a b": "a.pt"}}, "['a b']"),
        ({"archives": {"a": "a.pt"}, "sha256": "a" * 64}, "with archives, give each its own sha256"),
        ({"archives": {"a": "https://h/a.pt"}}, "archives['a']: "),
        ({"archives": {"a": "a.pt"}, "require_sha256": True}, "archives['a']: require_sha256 is set"),
        ({"archives": {"a": {"archive": "a.pt", "sha256": "xyz"}}}, "sha256 must be 64 hex digits"),
        ({"archives": {"a": {"archive": "a.pt", "pin": 1}}}, "pin"),
        ({"archive": "m.pt", "max_models_per_replica": 2}, "max_models_per_replica bounds the models of archives"),
        ({"archives": {f"m{i}": "a.pt" for i in range(257)}}, "more than 256 per application"),
    ],
)
def test_bad_archives_are_refused_with_the_rule(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        AppArgs(**fields)
    assert message in str(info.value)


def test_an_application_names_no_more_models_than_its_servers_can_ask_for() -> None:
    from tenfold.integration import _server, config

    assert config.MAX_ARCHIVES == _server.MAX_MODELS


def test_user_config_takes_the_form_of_the_applications_archives() -> None:
    from tenfold.integration.config import ModelsUpdate, ModelUpdate

    digest = "ab" * 32
    one = {"archive": "m.pt", "sha256": digest}
    assert ModelUpdate.model_validate(one).sha256 == digest
    update = ModelsUpdate.model_validate({"archives": {"alpha": {**one, "sha256": "SHA256:" + digest.upper()}}})
    assert update.archives["alpha"].sha256 == digest
    with pytest.raises(ValidationError, match="serves several models: give user_config as {archives: {NAME:"):
        ModelsUpdate.model_validate(one)
    with pytest.raises(ValidationError, match="serves one archive: give user_config as {archive: ..., sha256"):
        ModelUpdate.model_validate({"archives": {"alpha": one}})
    with pytest.raises(ValidationError, match="sha256"):
        ModelsUpdate.model_validate({"archives": {"alpha": {"archive": "m.pt"}}})  # each update names its archive


def test_routes_of_several_models_name_the_model_by_path_or_header() -> None:
    from tenfold.integration import routes

    models = ("alpha", "beta")
    assert routes.resolve("POST", "/app/alpha", "/app", models) == (routes.PREDICT, "alpha")
    assert routes.resolve("GET", "/beta/-/manifest", "", models) == (routes.MANIFEST, "beta")
    assert routes.resolve("GET", "/beta/-/openapi.json/", "", models) == (routes.OPENAPI, "beta")
    assert routes.resolve("GET", "/-/stats", "", models) == (routes.STATS, "")
    assert routes.resolve("POST", "/", "", models) == (routes.PREDICT, "")
    assert routes.pick_model(routes.PREDICT, "", "beta", models) == "beta"
    assert routes.pick_model(routes.MANIFEST, "", None, models) == ""  # the application's own
    assert routes.pick_model(routes.STATS, "", "beta", models) == ""  # the replica's, whatever the header
    for call, status, message in [
        (lambda: routes.resolve("POST", "/gamma", "", models), 404, "no model 'gamma' here: this application "
                                                                     "serves alpha, beta"),
        (lambda: routes.resolve("GET", "/alpha/-/stats", "", models), 404, "GET /alpha/-/manifest"),
        (lambda: routes.resolve("GET", "/alpha", "", models), 405, "POST inputs to /"),
        (lambda: routes.pick_model(routes.PREDICT, "", None, models), 404, "serve_multiplexed_model_id header"),
        (lambda: routes.pick_model(routes.PREDICT, "alpha", "beta", models), 400, "names model 'alpha'"),
        (lambda: routes.pick_model(routes.PREDICT, "", "gamma", models), 404, "no model 'gamma'"),
    ]:
        with pytest.raises(codec.HTTPError) as info:
            call()
        assert info.value.status == status and message in info.value.message, info.value.message
    assert isinstance(routes.model_not_found("x", models), LookupError)  # what a handle's caller catches


def test_replica_placement_and_shutdown_arguments_reach_serves_deployment_options() -> None:
    from tenfold.integration.builder import _deployment_options

    options = _deployment_options(AppArgs(archive="m.pt", resources={"model-node": 1},
                                          graceful_shutdown_timeout_s=3), "m")
    assert options["ray_actor_options"]["resources"] == {"model-node": 1}
    assert options["graceful_shutdown_timeout_s"] == 3
    # An idle replica stops at once, not after Serve's 2 s wait loop.
    assert options["graceful_shutdown_wait_loop_s"] == 0.25
    assert "resources" not in _deployment_options(AppArgs(archive="m.pt"), "m")["ray_actor_options"]


def test_pinned_digest_is_normalised() -> None:
    digest = "AB" * 32
    assert AppArgs(archive="m.pt", sha256=f"sha256:{digest}").sha256 == digest.lower()


# -- the autoscaling policy ------------------------------------------------------------------------


def test_policy_tracks_target_utilization() -> None:
    one = {"r1": 2.0}
    # 2 replicas at 0.35 = 0.7 replicas' worth of work: 1 replica at 0.7.
    assert desired_replicas(utilization={"a": 0.35, "b": 0.35}, queue_depth={}, interpreters={"a": 2, "b": 2},
                            target_utilization=0.7) == pytest.approx(1.0)
    assert desired_replicas(utilization={"r1": 0.7}, queue_depth={}, interpreters=one) == pytest.approx(1.0)
    assert desired_replicas(utilization={"r1": 1.0}, queue_depth={}, interpreters=one,
                            target_utilization=0.5) == pytest.approx(2.0)
    assert desired_replicas(utilization={"r1": 0.0}, queue_depth={}, interpreters=one) == 0.0


def test_policy_counts_waiting_calls_past_saturation() -> None:
    # Saturated, with 4 calls waiting behind 2 busy interpreters: 3 replicas' worth of work.
    d = desired_replicas(utilization={"r": 1.0}, queue_depth={"r": 6}, interpreters={"r": 2}, target_utilization=1.0)
    assert d == pytest.approx(3.0)
    # Requests queued at callers are spread over every interpreter.
    d = desired_replicas(utilization={"r": 1.0}, queue_depth={"r": 2}, interpreters={"r": 2}, queued_at_callers=4,
                         target_utilization=1.0)
    assert d == pytest.approx(3.0)


def test_policy_without_reports_keeps_the_current_target() -> None:
    assert desired_replicas(utilization={}, queue_depth={}, interpreters={}) is None
    with pytest.raises(ValueError, match="target_utilization"):
        desired_replicas(utilization={}, queue_depth={}, interpreters={}, target_utilization=0)
    with pytest.raises(ValueError, match="target_utilization"):
        UtilizationPolicy(target_utilization=2.0)


def _context(metrics: dict, *, running: list[str], current: int, target: int, queued: float = 0.0):
    from ray.serve.config import AutoscalingContext

    return AutoscalingContext(
        deployment_id=None, deployment_name="d", app_name="a", current_num_replicas=current,
        target_num_replicas=target, running_replicas=running, total_num_requests=0.0,
        total_queued_requests=queued, aggregated_metrics=metrics, raw_metrics={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={"keep": 1},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0, config=None,
    )


def test_policy_reads_serve_context_of_running_replicas_only() -> None:
    metrics = {
        UTILIZATION: {"r1": 1.0, "r2": 1.0, "gone": 1.0},
        QUEUE_DEPTH: {"r1": 1.0, "r2": 1.0, "gone": 9.0},
        INTERPRETERS: {"r1": 1.0, "r2": 1.0, "gone": 1.0},
    }
    desired, state = UtilizationPolicy(0.5)(_context(metrics, running=["r1", "r2"], current=2, target=2))
    assert desired == pytest.approx(4.0)
    assert state["keep"] == 1 and state["tenfold_desired"] == pytest.approx(4.0)
    desired, _ = utilization_policy(_context({}, running=["r1"], current=1, target=3))
    assert desired == 3  # nobody reported yet: hold


# -- HTTP codecs -----------------------------------------------------------------------------------


def test_json_inputs_are_converted_to_the_manifest_dtypes() -> None:
    x, k = codec.decode_json(b'{"inputs": [[[1, 2, 3, 4]], [5]]}', SPECS)
    assert x.dtype == np.float32 and x.shape == (1, 4) and k.dtype == np.int64 and k.tolist() == [5]
    vector = SPECS[0].model_copy(update={"shape": [None]})
    x, k = codec.decode_json(b'{"inputs": {"k": [], "x": []}}', [SPECS[1], vector])
    assert x.dtype == np.int64 and x.shape == (0,)
    assert json.loads(codec.encode_json([np.ones((1, 2), np.float32)])) == {"outputs": [[[1.0, 1.0]]]}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[1, 2]", 422, "must be a JSON object"),
        (b'{"input": []}', 422, 'exactly the key "inputs"'),
        (b'{"inputs": [], "extra": 1}', 422, 'exactly the key "inputs"'),
        (b'{"inputs": 3}', 422, "must be a list"),
        (b'{"inputs": [[[1, 2, 3, 4]]]}', 422, "takes 2 input(s) (x: float32[?, 4], k: int64[?]), got 1"),
        (b'{"inputs": [[[1, 2, 3]], [1]]}', 422, "input 0 (x) has shape [1, 3], expected x: float32[?, 4]"),
        (b'{"inputs": [[1, 2, 3, 4], [1]]}', 422, "input 0 (x) has shape [4]"),
        (b'{"inputs": [[[1, 2], [3]], [1]]}', 422, "input 0 (x) is not a rectangular array"),
        (b'{"inputs": [[["a", 2, 3, 4]], [1]]}', 422, "got strings"),
        (b'{"inputs": [[[true, false, true, true]], [1]]}', 422, "input 0 (x) must be float32, got booleans"),
        (b'{"inputs": [[[1, 2, 3, 4]], [1.5]]}', 422, "input 1 (k) must be int64, got floats"),
        (b'{"inputs": [[[1, 2, 3, 4]], [NaN]]}', 422, "input 1 (k) must be int64, got floats"),
        (b'{"inputs": [[[1, 2, 3, 4]], [100000000000000000000000]]}', 422, "input 1 (k)"),
        (b'{"inputs": {"x": [[1, 2, 3, 4]]}}', 422, "missing ['k']"),
    ],
)
def test_bad_json_is_a_4xx_naming_the_problem(body: bytes, status: int, message: str) -> None:
    with pytest.raises(codec.HTTPError) as info:
        codec.decode_json(body, SPECS)
    assert info.value.status == status
    assert message in info.value.message
    error = json.loads(info.value.body())["error"]
    assert error["status"] == status and message in error["message"]


def test_integers_out_of_range_are_refused() -> None:
    spec = [TensorSpec(name="b", dtype="int8", shape=[None])]
    assert codec.decode_json(b'{"inputs": [[1, -128]]}', spec)[0].dtype == np.int8
    with pytest.raises(codec.InvalidInput, match="out of range for int8"):
        codec.decode_json(b'{"inputs": [[1, 300]]}', spec)


def test_arrow_round_trip_keeps_dtypes_and_shapes() -> None:
    body = codec.encode_arrow([np.arange(8, dtype=np.float32).reshape(2, 4), np.array([3, 4])], ["x", "k"])
    x, k = codec.decode_arrow(body, SPECS)
    assert x.dtype == np.float32 and x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and k.tolist() == [3, 4]
    out = codec.decode_arrow_outputs(body)
    assert sorted(out) == ["k", "x"] and out["x"].shape == (2, 4)


def test_bad_arrow_is_a_4xx_naming_the_problem() -> None:
    import pyarrow as pa

    with pytest.raises(codec.MalformedRequest, match="not an Arrow IPC stream"):
        codec.decode_arrow(b"definitely not arrow", SPECS)
    wrong_names = codec.encode_arrow([np.zeros((1, 4), np.float32), np.zeros(1, np.int64)], ["a", "k"])
    with pytest.raises(codec.InvalidInput, match=r"columns must be \['x', 'k'\]"):
        codec.decode_arrow(wrong_names, SPECS)
    wrong_dtype = codec.encode_arrow([np.zeros((1, 4), np.float64), np.zeros(1, np.int64)], ["x", "k"])
    with pytest.raises(codec.InvalidInput, match="column .x. has type float64, which does not convert safely"):
        codec.decode_arrow(wrong_dtype, SPECS)
    wrong_shape = codec.encode_arrow([np.zeros((1, 5), np.float32), np.zeros(1, np.int64)], ["x", "k"])
    with pytest.raises(codec.InvalidInput, match=r"column 'x' has shape \[1, 5\]"):
        codec.decode_arrow(wrong_shape, SPECS)
    table = pa.table({"x": pa.array(["a"]), "k": pa.array([1])})
    with pytest.raises(codec.InvalidInput, match="column 'x' has Arrow type string"):
        codec.decode_arrow(_ipc(table), SPECS)
    table = pa.table({"x": pa.array([1.0, None]), "k": pa.array([1, 2])})
    with pytest.raises(codec.InvalidInput, match="null"):
        codec.decode_arrow(_ipc(table), [TensorSpec(name="x", dtype="float32", shape=[None]),
                                                         SPECS[1]])
    bools = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.bool_(), [4]),
                                           pa.FixedSizeListArray.from_arrays(pa.array([True] * 4), 4))
    table = pa.table({"x": bools, "k": pa.array([1])})
    with pytest.raises(codec.InvalidInput, match="column 'x' is a tensor column numpy cannot take"):
        codec.decode_arrow(_ipc(table), SPECS)


def _ipc(table: Any) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_outputs_of_different_lengths_cannot_share_an_arrow_table() -> None:
    with pytest.raises(codec.HTTPError, match="different first dimensions"):
        codec.encode_arrow([np.zeros(2), np.zeros(3)], ["a", "b"])


# -- configs/ --------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted(ROOT.glob("configs/*.yaml")),
                         ids=lambda p: p.name)
def test_every_config_is_a_valid_serve_config_with_valid_app_args(config: Path) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(config.read_text()))
    for app in schema.applications:
        if app.import_path == "examples.composition:app_builder":  # an ingress of its own over tenfold models
            from examples.composition import CompositionArgs

            composed = CompositionArgs.model_validate(app.args)
            archives = [composed.embedder, composed.search]
        else:
            assert app.import_path == "tenfold.integration:app_builder"
            archives = [ref.archive for ref in AppArgs.model_validate(app.args).archive_refs.values()]
        assert all(a.startswith("build/") for a in archives)
