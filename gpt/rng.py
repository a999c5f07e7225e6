"""Randomness that a resumed run reproduces exactly.

Batches are a pure function of (seed, index) (gpt/data.py), and torch is reseeded at every
iteration with `iteration_seed(seed, rank, iteration)`, so dropout masks depend on nothing
else. The generators' own states are saved in every checkpoint too (`RngState`), so
whatever else draws from Python's, numpy's, torch's or CUDA's generator continues where it was.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def iteration_seed(seed: int, rank: int, iteration: int) -> int:
    """The torch seed of one iteration on one rank: dropout masks depend on nothing else."""
    return int(np.random.SeedSequence([seed, rank, iteration]).generate_state(1, dtype=np.uint64)[0] >> 1)


class RngState:
    """The Python, numpy, torch and CUDA generators of this process, as a stateful object whose
    state_dict() is JSON."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": _encode(torch.get_rng_state()),
            "cuda": None,
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = [_encode(s) for s in torch.cuda.get_rng_state_all()]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(_decode(state["torch"]))
        if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_decode(s) for s in state["cuda"]])


def _encode(generator_state: torch.Tensor) -> str:
    return base64.b64encode(generator_state.numpy().tobytes()).decode()


def _decode(encoded: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8)
