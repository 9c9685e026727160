"""Resumable training helpers: checkpoints (tensors only, loaded with weights_only=True), loss log."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def save_checkpoint(path: Path, model, optimizer, step: int, extra: dict | None = None,
                    ema: EMA | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "rng": torch.get_rng_state(), "extra": json.dumps(extra or {})}
    if ema is not None:
        state["ema"] = ema.shadow
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer, ema: EMA | None = None) -> tuple[int, dict]:
    """Resume: returns (step, extra). A missing checkpoint means step 0."""
    if not path.is_file():
        return 0, {}
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if ema is not None:
        ema.shadow = state["ema"] if "ema" in state else ema.copy_of(model)
    return int(state["step"]), json.loads(state["extra"])


class EMA:
    """Exponential moving average of a model's floating-point weights (sampled from instead of the raw weights)."""

    def __init__(self, model, decay: float = 0.999):
        self.decay = decay
        self.shadow = self.copy_of(model)

    @staticmethod
    def copy_of(model) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                for k, v in model.state_dict().items()}

    def weights_for(self, model) -> dict[str, torch.Tensor]:
        """The averaged weights in `model`'s dtypes, ready for `load_state_dict`."""
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        return {k: v.to(dtypes[k]) for k, v in self.shadow.items()}

    @torch.no_grad()
    def update(self, model, updates: int | None = None) -> None:
        """`updates` (steps since training started) warms the decay up: min(decay, (1 + n) / (10 + n))."""
        decay = self.decay if updates is None else min(self.decay, (1 + updates) / (10 + updates))
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[key].lerp_(value.detach().float(), 1.0 - decay)
            else:
                self.shadow[key].copy_(value)


def cosine_lr(step: int, start: int, end: int, peak: float, floor_ratio: float = 0.1) -> float:
    """Cosine decay from `peak` at `start` to `peak * floor_ratio` at `end`."""
    import math

    progress = min(max((step - start) / max(end - start, 1), 0.0), 1.0)
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def warm_start(name: str, model, folder: Path | None = None, bundled: bool = True) -> tuple[int, float]:
    """No checkpoint yet: continue from existing weights (optimizer state starts fresh). `folder` (the
    training's output folder) is tried first, then (if `bundled`) the bundled weights.

    Returns (step, wall seconds) recorded on the model card, or (0, 0.0) when there are no weights."""
    from ..weights import load_state

    for source in ([folder] if folder else []) + ([None] if bundled else []):
        try:
            state, card = load_state(name, source)
            break
        except Exception:  # missing or unreadable weights: try the next source, else train from scratch
            continue
    else:
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
