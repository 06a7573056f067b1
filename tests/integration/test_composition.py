"""tenfold models as deployments inside a larger application: examples/composition.py's FastAPI ingress, with its
own route and request model, calls the embedder and the search model through DeploymentHandles, built from
configs/composition.yaml's arguments."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml
from support import ROOT

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def composed(serve_session, minilm_archive: Path, search_archive: Path) -> Iterator[SimpleNamespace]:  # noqa: ANN001
    from ray import serve

    from examples.composition import CompositionArgs, app_builder

    (config,) = yaml.safe_load((ROOT / "configs" / "composition.yaml").read_text())["applications"]
    # The YAML's arguments, with the archives this session packaged in place of build/'s.
    args = CompositionArgs.model_validate({**config["args"], "embedder": str(minilm_archive),
                                           "search": str(search_archive), "num_cpus": 0.5})
    serve.run(app_builder(args), name="composition", route_prefix="/composition")
    try:
        yield SimpleNamespace(url=f"{serve_session.url}/composition", search=serve.get_deployment_handle(
            "search", app_name="composition"))
    finally:
        serve.delete("composition")


def test_the_ingress_answers_its_own_route_from_both_models(composed: SimpleNamespace) -> None:
    r = requests.post(f"{composed.url}/ask", json={"question": "How does a replica answer requests?", "k": 2},
                      timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["embedding_dimensions"] == 384
    assert len(answer["hits"]) == 2 and answer["hits"][0]["score"] >= answer["hits"][1]["score"]
    assert "replica" in answer["hits"][0]["text"]
    # The ingress's own request model and its OpenAPI document are FastAPI's.
    assert requests.post(f"{composed.url}/ask", json={"k": 2}, timeout=30).status_code == 422
    assert "/ask" in requests.get(f"{composed.url}/openapi.json", timeout=30).json()["paths"]


def test_a_model_refusing_its_inputs_raises_value_error_across_the_hop(composed: SimpleNamespace) -> None:
    r = requests.post(f"{composed.url}/ask", json={"question": "anything", "k": 0}, timeout=60)
    assert r.status_code == 422 and "'k'" in r.json()["detail"], r.text  # the ingress caught a ValueError
    with pytest.raises(ValueError, match="'k'"):
        composed.search.remote("anything", k=0).result()
    hits = composed.search.remote("anything", k=1).result()
    assert isinstance(hits, list) and set(hits[0]) == {"text", "score"}  # Python values, not JSON text
