"""A small transformer text encoder whose tokenizer is written in Python and runs inside the model.

Input is UTF-8 text as a uint8 tensor (one zero-padded row per text, see `encode_texts`); forward
decodes it, normalises and splits it, applies a greedy longest-match WordPiece tokenizer, then runs
a 4-layer transformer encoder and returns one L2-normalised embedding per text.

    tenfold package examples.text_encoder:build -o text_encoder.pt
"""

from __future__ import annotations

import re
import unicodedata

import torch
from torch import nn

MAX_TOKENS = 64
DYNAMIC = {"text": (0, 1)}  # batch and text length both vary

_WORDS = (
    "the of and to in is was for that on as with by he it at from his an were are which this be or has "
    "had not first one their its new after who they have her she two been other when there all during into "
    "school time may years more most only over city some world would where later up such used many can state "
    "about national out known university united then made serve model python torch tensor interpreter process "
    "memory weight share load package data fast slow core thread lock run call queue batch request"
).split()
_PIECES = ("ing", "ed", "er", "es", "s", "ly", "tion", "al", "ment", "ness", "able", "est", "ize", "ful")
_SPLIT = re.compile(r"\w+|[^\w\s]")


def _vocabulary() -> dict[str, int]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,;:!?'\"()-")
    entries = specials + chars + ["##" + c for c in chars[:36]] + list(_WORDS) + ["##" + p for p in _PIECES]
    vocab: dict[str, int] = {}
    for entry in entries:
        vocab.setdefault(entry, len(vocab))
    return vocab


class WordPieceTokenizer:
    """Lower-cases, strips accents, splits on spaces and punctuation, then matches the longest known piece."""

    def __init__(self, vocab: dict[str, int], max_tokens: int = MAX_TOKENS) -> None:
        self.vocab = vocab
        self.max_tokens = max_tokens
        self.pad, self.unk, self.cls, self.sep = (vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))

    def normalize(self, text: str) -> str:
        text = unicodedata.normalize("NFKD", text.lower())
        return "".join(c for c in text if not unicodedata.combining(c))

    def word_pieces(self, word: str) -> list[int]:
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return ids

    def __call__(self, text: str) -> list[int]:
        ids = [self.cls]
        for word in _SPLIT.findall(self.normalize(text)):
            ids.extend(self.word_pieces(word))
        return ids[: self.max_tokens - 1] + [self.sep]


class TextEncoder(nn.Module):
    def __init__(self, dim: int = 128, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.tokenizer = WordPieceTokenizer(_vocabulary())
        self.embed = nn.Embedding(len(self.tokenizer.vocab), dim)
        self.position = nn.Parameter(torch.randn(MAX_TOKENS, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [bytes(row).rstrip(b"\0").decode("utf-8", errors="replace") for row in text.tolist()]
        ids = [self.tokenizer(row) for row in rows]
        width = max(len(i) for i in ids)
        tokens = torch.full((len(ids), width), self.tokenizer.pad, dtype=torch.int64)
        for r, row in enumerate(ids):
            tokens[r, : len(row)] = torch.tensor(row)
        return tokens, tokens == self.tokenizer.pad

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """text: uint8 [batch, bytes] (UTF-8, zero padded) -> embeddings float32 [batch, dim]"""
        tokens, padding = self.tokenize(text)
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=padding))
        keep = (~padding).unsqueeze(2).to(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1)
        return nn.functional.normalize(pooled, dim=1)


def encode_texts(texts: list[str]) -> torch.Tensor:
    """UTF-8 bytes of `texts`, one zero-padded uint8 row each: the model's input."""
    data = [t.encode("utf-8") for t in texts]
    out = torch.zeros(len(data), max(1, max(len(d) for d in data)), dtype=torch.uint8)
    for r, d in enumerate(data):
        out[r, : len(d)] = torch.tensor(list(d), dtype=torch.uint8)
    return out


def build(seed: int = 0) -> TextEncoder:
    """The encoder with weights drawn from `seed` (the same model every time)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TextEncoder().eval()


def example_inputs() -> tuple[torch.Tensor]:
    return (encode_texts(["Serving models from several interpreters.", "Café data loads fast!"]),)
