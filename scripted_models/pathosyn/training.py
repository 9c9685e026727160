"""Resumable training helpers: checkpoints (tensors only, loaded with weights_only=True), loss log."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def save_checkpoint(path: Path, model, optimizer, step: int, extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "rng": torch.get_rng_state(), "extra": json.dumps(extra or {})}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer) -> tuple[int, dict]:
    """Resume: returns (step, extra). A missing checkpoint means step 0."""
    if not path.is_file():
        return 0, {}
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), json.loads(state["extra"])


def warm_start(name: str, model) -> tuple[int, float]:
    """No checkpoint yet: continue from the committed weights (optimizer state starts fresh).

    Returns (step, wall seconds) recorded on the model card, or (0, 0.0) when there are no weights."""
    from ..weights import load_state

    try:
        state, card = load_state(name)
    except Exception:  # missing or unreadable weights: train from scratch
        return 0, 0.0
    model.load_state_dict(state)
    return int(card.get("steps", 0)), float(card.get("wall_time_s", 0.0))


class LossLog:
    """Appends JSON lines {step, loss, ...} and prints a running mean."""

    def __init__(self, path: Path, every: int = 50):
        self.path, self.every, self.buffer, self.t0 = path, every, [], time.time()
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, step: int, loss: float, **extra) -> None:
        self.buffer.append(loss)
        if step % self.every == 0:
            mean = sum(self.buffer) / len(self.buffer)
            row = {"step": step, "loss": round(mean, 5), "elapsed_s": round(time.time() - self.t0, 1), **extra}
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            self.buffer = []
