"""Semantic search over a small corpus: code plus data in one archive.

The all-MiniLM-L6-v2 encoder of `examples.minilm_embedder`, the corpus' texts and their embeddings (computed
once when the archive is built, stored in it as a tensor and shared by every interpreter) answer
`(query: str, k: int)` with the `k` closest texts and their cosine similarity.

    tenfold package examples.semantic_search:build -o semantic_search.pt
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from typing_extensions import TypedDict

from examples.minilm_embedder import MiniLMEmbedder, model_dir

CORPUS = [
    "Ray Serve scales model serving across a cluster of machines.",
    "A replica is one process that answers requests for a deployment.",
    "The global interpreter lock lets one thread run Python bytecode at a time.",
    "Several interpreters in one process each have their own lock.",
    "TorchScript extracts a model from Python so that it runs without the interpreter.",
    "A torch.package archive holds a model's code and its weights together.",
    "Shared memory lets processes read the same bytes without copying them.",
    "The object store keeps large values where every worker on a node can map them.",
    "Autoscaling adds replicas when the load rises and removes them when it falls.",
    "A tokenizer splits text into the pieces a language model reads.",
    "Sentence embeddings place texts with similar meaning close together.",
    "Cosine similarity compares the direction of two vectors.",
    "Batching several requests into one call raises throughput on accelerators.",
    "A health check lets the controller replace a replica that stopped answering.",
    "Memory-mapped files are loaded lazily, page by page, when first read.",
    "The kitchen smelled of fresh bread and cinnamon all morning.",
    "Our hiking trail climbed through pine forest to a windy ridge.",
    "The orchestra tuned its instruments before the concert began.",
    "A cup of green tea has less caffeine than a cup of coffee.",
    "The tide went out and left small pools full of crabs on the rocks.",
    "She planted tomatoes, basil and peppers in the garden this spring.",
    "The football match went to penalties after a goalless draw.",
    "Snow closed the mountain pass for three days in January.",
    "The library lends books, films and music for three weeks at a time.",
]


class Hit(TypedDict):
    text: str
    score: float


class SemanticSearch:
    """The `k` texts of the corpus closest in meaning to `query`, best first."""

    def __init__(self, encoder: MiniLMEmbedder, corpus: list[str]) -> None:
        self.encoder = encoder
        self.corpus = list(corpus)
        self.embeddings = encoder.embed(self.corpus)  # [len(corpus), 384], unit length

    def __call__(self, query: str, k: Annotated[int, Field(ge=1, le=len(CORPUS))]) -> list[Hit]:
        import torch

        scores = self.embeddings @ self.encoder.embed([query])[0]
        best = torch.topk(scores, min(k, len(self.corpus)))
        return [Hit(text=self.corpus[i], score=round(float(s), 6)) for s, i in zip(best.values, best.indices)]


def build() -> SemanticSearch:
    return SemanticSearch(MiniLMEmbedder(model_dir()), CORPUS)


def example_inputs() -> tuple[str, int]:
    return ("How do I serve a model on many machines?", 3)
