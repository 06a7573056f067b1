"""A Python-heavy sequence tagger: a bidirectional GRU stepped in Python, then Viterbi decoding in Python.

Every time step is a Python-level loop iteration with data-dependent control flow (a sentence
boundary token resets the recurrent state), which is the kind of model one GIL serves badly.

    tenfold package examples.rnn_tagger:build -o rnn_tagger.pt
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 1000
TAGS = 12
BOUNDARY = 1  # token id that ends a sentence: the recurrent state starts afresh after it
DYNAMIC = {"tokens": (0, 1)}  # batch and sequence length both vary


class RNNTagger(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 64, hidden: int = 96, tags: int = TAGS) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.forward_cell = nn.GRUCell(dim, hidden)
        self.backward_cell = nn.GRUCell(dim, hidden)
        self.emit = nn.Linear(2 * hidden, tags)
        self.transitions = nn.Parameter(torch.randn(tags, tags) * 0.1)
        self.hidden = hidden

    def _run(self, cell: nn.GRUCell, embedded: torch.Tensor, tokens: torch.Tensor, steps: range) -> list:
        h = embedded.new_zeros(embedded.shape[0], self.hidden)
        outputs: list = [None] * embedded.shape[1]
        for t in steps:
            h = cell(embedded[:, t], h)
            outputs[t] = h
            boundary = tokens[:, t] == BOUNDARY
            if bool(boundary.any()):
                h = torch.where(boundary.unsqueeze(1), torch.zeros_like(h), h)
        return outputs

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: int64 [batch, length] -> (emission scores [batch, length, tags], best tags [batch, length])"""
        embedded = self.embed(tokens)
        length = tokens.shape[1]
        fwd = self._run(self.forward_cell, embedded, tokens, range(length))
        bwd = self._run(self.backward_cell, embedded, tokens, range(length - 1, -1, -1))
        states = torch.stack([torch.cat([f, b], dim=1) for f, b in zip(fwd, bwd)], dim=1)
        scores = self.emit(states)
        return scores, self._viterbi(scores)

    def _viterbi(self, scores: torch.Tensor) -> torch.Tensor:
        best = scores[:, 0]
        backpointers = []
        for t in range(1, scores.shape[1]):
            candidates = best.unsqueeze(2) + self.transitions.unsqueeze(0)
            best, pointer = candidates.max(dim=1)
            best = best + scores[:, t]
            backpointers.append(pointer)
        tag = best.argmax(dim=1)
        path = [tag]
        for pointer in reversed(backpointers):
            tag = pointer.gather(1, tag.unsqueeze(1)).squeeze(1)
            path.append(tag)
        path.reverse()
        return torch.stack(path, dim=1)


def build(seed: int = 0) -> RNNTagger:
    """The tagger with weights drawn from `seed` (the same model every time)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RNNTagger().eval()


def example_inputs(batch: int = 2, length: int = 24, seed: int = 1) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (batch, length), generator=g)
    tokens[:, length // 2] = BOUNDARY
    return (tokens,)
