"""A model that does nothing: it answers the text it is given. What serving a request costs besides the model
(`tenfold bench dataplane` measures it)."""

from __future__ import annotations


class Echo:
    def __call__(self, text: str) -> str:
        return text


def build() -> Echo:
    return Echo()


def example_inputs() -> tuple[str]:
    return ("tenfold serves Python models",)
