"""tenfold models inside a larger Serve application: a FastAPI ingress of your own, with its own route and request
model, that calls the embedder and the semantic search model through DeploymentHandles.

    tenfold package examples.minilm_embedder:build -o build/minilm_embedder.pt     (once each)
    tenfold package examples.semantic_search:build -o build/semantic_search.pt
    serve run configs/composition.yaml
    curl -s -X POST http://127.0.0.1:8000/ask -H 'Content-Type: application/json' -d '{"question": "a replica?"}'

Handle calls keep their Python values (a list of hits, a list of vectors) and their exception types across the
hop: inputs that do not fit a model's signature raise ValueError in the ingress, naming the input.
"""

# No `from __future__ import annotations`: Serve reads the builder's annotation, and FastAPI the routes'.
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

import tenfold.integration

api = FastAPI(title="Ask the corpus", description="Semantic search and embeddings, served by tenfold models.")


class Question(BaseModel):
    question: str = Field(description="What to look for in the corpus.")
    k: int = Field(3, description="How many texts to answer with.")


class Answer(BaseModel):
    hits: list[dict[str, Any]] = Field(description="The closest texts, best first, with their cosine similarity.")
    embedding_dimensions: int = Field(description="The length of the question's embedding.")


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Ingress:
    def __init__(self, embedder: DeploymentHandle, search: DeploymentHandle) -> None:
        self.embedder, self.search = embedder, search

    @api.post("/ask")
    async def ask(self, question: Question) -> Answer:
        try:
            hits = await self.search.remote(question.question, k=question.k)  # by name, as over HTTP
        except ValueError as exc:  # the search model's signature refused k: the caller's mistake
            raise HTTPException(status_code=422, detail=str(exc)) from None
        vectors = await self.embedder.remote([question.question])
        return Answer(hits=hits, embedding_dimensions=len(vectors[0]))


class CompositionArgs(BaseModel):
    """The application's arguments (`args` of a `serve run` YAML)."""

    embedder: str = Field(description="The embedder's archive (a path or URI, as tenfold's `archive`).")
    search: str = Field(description="The semantic search model's archive.")
    interpreters: int = Field(1, description="Interpreters per replica of each model.")
    num_cpus: float | None = Field(None, description="CPUs per replica of each model (default: interpreters).")


def app_builder(args: CompositionArgs) -> Application:
    """The ingress bound to one tenfold deployment per model: Serve passes each to it as a DeploymentHandle."""
    models = {"interpreters": args.interpreters, **({"num_cpus": args.num_cpus} if args.num_cpus else {})}
    return Ingress.bind(
        tenfold.integration.app_builder({"archive": args.embedder, "name": "embedder", **models}),
        tenfold.integration.app_builder({"archive": args.search, "name": "search", **models}),
    )
