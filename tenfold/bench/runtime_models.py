"""The models of `tenfold bench runtime`, and the functions that drive them in every kind of worker.

Everything here is module-level because functions travel to interpreters by module and qualified name.
The same functions run in a namespace interpreter, in a thread of the host and in a spawned process,
so each mode measures exactly the same loop.
"""

from __future__ import annotations

import os
import time
from typing import Any

#: name -> what the model is, for tables and plots.
MODELS: dict[str, str] = {
    "mlp": "Python-heavy: 8x Linear(64,64)+ReLU, batch 4, layers stepped in Python",
    "rnn": "Python-heavy: GRUCell(32,64) stepped 16 times in Python, data-dependent early exit, batch 1",
    "conv": "compute-heavy: 3-layer conv net, batch 8 of 3x64x64",
    "generate": "Python-heavy Hugging Face: GPT-2 (2 layers, width 64, random weights) generate() of 16 tokens, "
                "greedy, batch 1",
}

#: Models TorchScript can take (generate() is Python control flow over a model, not a graph).
SCRIPTABLE = ("mlp", "rnn", "conv")

# (name, scripted) -> (model, example input), one per worker (interpreter, process or host).
_loaded: dict[tuple[str, bool], tuple[Any, Any]] = {}


def _build(name: str) -> tuple[Any, Any]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":

        class MLP(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(8))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                for layer in self.layers:
                    x = torch.relu(layer(x))
                return x

        return MLP().eval(), torch.randn(4, 64)
    if name == "rnn":

        class Stepper(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.cell = nn.GRUCell(32, 64)
                self.inp = nn.Linear(64, 32)
                self.out = nn.Linear(64, 1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                h = torch.zeros(x.shape[0], 64)
                for _ in range(16):
                    h = self.cell(x, h)
                    if bool(self.out(h).sum() > 1e6):  # never true: the check is the Python work
                        break
                    x = torch.tanh(self.inp(h))
                return h

        return Stepper().eval(), torch.randn(1, 32)
    if name == "conv":
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
        )
        return model.eval(), torch.randn(8, 3, 64, 64)
    if name == "generate":
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging

        logging.set_verbosity_error()  # generate() would warn about its defaults on every call
        lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=512, n_positions=64)).eval()

        class Generate(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lm = lm

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.lm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, min_new_tokens=16,
                                        do_sample=False, pad_token_id=0)

        return Generate().eval(), torch.randint(1, 512, (1, 8))
    raise ValueError(f"unknown benchmark model {name!r}; known: {', '.join(MODELS)}")


def load(name: str, scripted: bool = False) -> None:
    """Build model `name` in this worker (eager, or TorchScript when `scripted`); idempotent."""
    import torch

    key = (name, scripted)
    if key in _loaded:
        return
    model, x = _build(name)
    if scripted:
        with torch.inference_mode(False), torch.no_grad():
            # The RNN's early exit is control flow that tracing would freeze, so it is scripted.
            model = torch.jit.script(model) if name == "rnn" else torch.jit.trace(model, x)
            model = torch.jit.freeze(model)
    _loaded[key] = (model, x)


def run(name: str, scripted: bool, warmup_s: float, seconds: float) -> tuple[int, float]:
    """Warm up for `warmup_s`, then run inferences for `seconds`: (inferences, seconds measured)."""
    import torch

    model, x = _loaded[(name, scripted)]
    perf = time.perf_counter
    with torch.inference_mode():
        warm, end = 0, perf() + warmup_s
        while perf() < end or warm < 3:  # TorchScript's profiling executor optimises after a few calls
            model(x)
            warm += 1
        n, start = 0, perf()
        end = start + seconds
        while perf() < end:
            model(x)
            n += 1
        return n, perf() - start


def echo(value: Any) -> Any:
    """The trivial call of the round-trip measurement."""
    return value


def import_torch() -> dict[str, Any]:
    """Import torch here; what the start-up measurement waits for. Returns this worker's settings."""
    import threading

    t0, cpu0 = time.perf_counter(), time.thread_time()
    import torch

    return {
        "import_s": time.perf_counter() - t0,
        # Much less CPU than wall time, on an idle machine, means the import waited (for a lock, or disk).
        "import_cpu_s": time.thread_time() - cpu0,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python_threads": threading.active_count(),
        "pid": os.getpid(),
    }


def worker_info() -> dict[str, Any]:
    """Intra-op threads and OS threads as this worker sees them (to diagnose oversubscription)."""
    import torch

    try:
        os_threads = len(os.listdir("/proc/self/task"))
    except OSError:
        os_threads = -1
    return {
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "process_os_threads": os_threads,
    }


def process_worker(conn: Any, go: Any) -> None:
    """Body of one spawned process of the `processes` mode: obeys (op, *args) messages on `conn`.

    "arm" answers at once, then waits for the `go` event before it runs, so that all processes count
    over the same interval and none of the spawn or import time is measured.
    """
    import torch

    torch.set_num_threads(1)
    conn.send(("ok", None))
    while True:
        op, *args = conn.recv()
        if op == "stop":
            return
        try:
            result: Any = None
            if op == "load":
                load(*args)
            elif op == "info":
                result = worker_info()
            elif op == "arm":
                conn.send(("ok", None))
                go.wait()
                result = run(*args)
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:  # noqa: BLE001 - sent back to the parent, which raises it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(("ok", result))
