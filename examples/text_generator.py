"""A small character-level text generator that streams its tokens as it produces them.

A GRU language model over bytes (its weights seeded, so that every build is the same model: it writes
fluent-looking nonsense, not English). Its call is a generator: served by tenfold, each token crosses to
the client as soon as it is sampled, as newline-delimited JSON or server-sent events.

    tenfold package examples.text_generator:build -o text_generator.pt
    curl -N -H 'content-type: application/json' -d '{"inputs": ["Once upon a time", 64]}' localhost:8000/
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import torch
from pydantic import Field


class TextGenerator(torch.nn.Module):
    """`prompt` continued by up to `max_tokens` bytes, yielded one token (a character) at a time."""

    def __init__(self, hidden: int = 256, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(256, hidden)
        self.rnn = torch.nn.GRU(hidden, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 256)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)

    def forward(self, prompt: str, max_tokens: Annotated[int, Field(ge=1, le=1024)]) -> Iterator[str]:
        data = list(prompt.encode("utf-8")[-512:]) or [32]
        _, state = self.rnn(self.embed(torch.tensor([data])))
        token = data[-1]
        # Sampled, from a generator seeded by the prompt: the same prompt gives the same answer anywhere.
        sampler = torch.Generator().manual_seed(sum(data) * 31 + len(data))
        for _ in range(max_tokens):
            out, state = self.rnn(self.embed(torch.tensor([[token]])), state)
            logits = self.head(out[0, -1])
            # Printable ASCII only: every token is a whole character of the answer.
            logits[:32] = logits[127:] = float("-inf")
            token = int(torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=sampler))
            yield chr(token)


def build() -> TextGenerator:
    return TextGenerator().eval()


def example_inputs() -> tuple[str, int]:
    return ("Once upon a time", 8)
