"""Bundled weights: <name>.safetensors + <name>.json model card (with sha256), verified at load."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ..errors import WeightsError

WEIGHTS_DIR = Path(__file__).resolve().parent


def weights_dir() -> Path:
    """PATHOSYN_WEIGHTS_DIR overrides the bundled folder (tests, custom models)."""
    return Path(os.environ.get("PATHOSYN_WEIGHTS_DIR", WEIGHTS_DIR))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_card(name: str, folder: Path | None = None) -> dict:
    folder = Path(folder) if folder else weights_dir()
    card_path = folder / f"{name}.json"
    if not card_path.is_file():
        raise WeightsError(f"model card missing: {card_path}")
    try:
        return json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"model card {card_path} is not valid JSON: {exc}") from None


def load_state(name: str, folder: Path | None = None) -> tuple[dict, dict]:
    """(state_dict, card). Verifies the file's sha256 against the card before parsing it."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder else weights_dir()
    path = folder / f"{name}.safetensors"
    if not path.is_file():
        command = "pathosyn train-pathar" if name.startswith("pathar") else "pathosyn train"
        raise WeightsError(f"weights file missing: {path} (train with `{command}` or restore the bundle)")
    card = load_card(name, folder)
    expected = card.get("sha256")
    actual = sha256_of(path)
    if expected != actual:
        raise WeightsError(
            f"weights file {path.name} is corrupted: sha256 {actual[:12]}... != card {str(expected)[:12]}...")
    try:
        return load_file(str(path)), card
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise WeightsError(f"cannot parse {path.name}: {exc}") from None


def write_card(name: str, card: dict, folder: Path | None = None) -> None:
    """A model card as JSON, written to a temporary file and renamed."""
    folder = Path(folder or weights_dir())
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / f"{name}.json")


def add_metrics(name: str, metrics: dict, folder: Path | None = None) -> None:
    """Merge evaluation metrics into a model card (the weights file and its sha256 are unchanged)."""
    card = load_card(name, folder)
    card.setdefault("metrics", {}).update(metrics)
    write_card(name, card, folder)


def write_safetensors(state: dict, path: Path) -> Path:
    """A state dict as safetensors, written to a temporary file in the same folder and renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".safetensors.tmp")
    os.close(fd)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def save_state(name: str, state: dict, card: dict, folder: Path | None = None) -> Path:
    """Write weights, then their card (atomically each); the card gets the sha256 of the written file."""
    folder = Path(folder or weights_dir())
    path = write_safetensors(state, folder / f"{name}.safetensors")
    write_card(name, dict(card, sha256=sha256_of(path), file=path.name), folder)
    return path


def render_model_cards(folder: Path | None = None) -> Path:
    """MODEL_CARD.md: one section per JSON card (data, steps, wall time, metrics, sha256)."""
    folder = Path(folder or weights_dir())
    lines = ["# Model cards", "", "Generated from the JSON cards next to each `.safetensors` file "
             "(`python -c 'from scripted_models.weights import render_model_cards; render_model_cards()'`).", ""]
    for card_path in sorted(folder.glob("*.json")):
        card = json.loads(card_path.read_text())
        lines += [f"## {card_path.stem}", "", card.get("family", ""), ""]
        for key in ("steps", "batch", "crop", "wall_time_s", "train_precision", "history", "sampler", "bundled_because",
                    "license"):
            if key in card:
                lines.append(f"- **{key}**: {card[key]}")
        selection = card.get("selection") or {}
        if selection.get("rule") == "best_val":
            curve = ", ".join(f"{c['step']}: {c['nll_structure']}/{c['nll_appearance']}"
                              for c in selection.get("val_curve", []))
            lines.append(f"- **selected step**: {selection.get('selected_step')} (lowest held-out NLL; "
                         f"structure/appearance NLL by step: {curve})")
        elif selection.get("curve") and "pass_fraction" in selection["curve"][0]:  # --select realism
            curve = ", ".join(f"{c['step']}: {c['pass_fraction']} / {c['wasserstein']}" for c in selection["curve"])
            losses = ", ".join(f"{c['step']}: {c['val_loss']}" for c in selection.get("loss_curve", []))
            lines.append(f"- **selected step**: {selection.get('selected_step')} ({selection.get('rule')}; "
                         f"validation-fold pass fraction / Wasserstein by step: {curve}; denoising loss by step: "
                         f"{losses})")
        elif selection.get("curve") and "mae" in selection["curve"][0]:  # anatomy
            curve = ", ".join(f"{c['step']}: {c['mae']}" for c in selection["curve"])
            lines.append(f"- **selected step**: {card.get('steps_selected')} ({selection.get('rule')}; "
                         f"by step: {curve})")
        elif selection.get("curve"):
            curve = ", ".join(f"{c['step']}: {c['val_loss']}" for c in selection["curve"])
            lines.append(f"- **selected step**: {selection.get('selected_step')} ({selection.get('rule')}; "
                         f"validation loss by step: {curve})")
        smoothing = card.get("fill_smoothing")
        if smoothing:
            raw, fitted = smoothing["raw_fill"], smoothing["fitted"]
            lines.append(f"- **fill smoothing** (`pathosyn calibrate anatomy`; {smoothing.get('used_by', '')}): "
                         f"{smoothing['setting']}; {smoothing.get('data', '')}: MSE small / lesion-sized holes "
                         f"{raw['small_holes_mse']} / {raw['lesion_sized_holes_mse']} -> {fitted['small_holes_mse']} / "
                         f"{fitted['lesion_sized_holes_mse']}. {smoothing.get('adopted_because', '')}".rstrip())
        if "data" in card:
            lines.append(f"- **training data**: {', '.join(map(str, card['data']))}")
        patch = card.get("patch") or {}
        if patch.get("elastic_per_case"):
            lines.append(f"- **patches per training case**: {patch['augment_per_case']} rigid poses + "
                         f"{patch['elastic_per_case']} elastic deformations ({patch['elastic_mm']} mm)")
        if patch.get("blend_per_case"):
            share = card.get("structure_only_share")  # transformer cards only
            lines.append(f"- **structure-only blends per training case**: {patch['blend_per_case']} (signed-distance "
                         f"morph with another training lesion, t in {patch['blend_range']}"
                         + (f"; share of transformer rows {share})" if share is not None else ")"))
        if patch.get("pseudo_labelled"):
            lines.append(f"- **rule-based pseudo-labels**: {', '.join(patch['pseudo_labelled'])}")
        if "held_out" in card:
            held = card["held_out"]
            text = "; ".join(f"{k} fold: {', '.join(v)}" for k, v in held.items()) if isinstance(held, dict) \
                else ", ".join(held)
            lines.append(f"- **held out**: {text}")
        for key, value in (card.get("metrics") or {}).items():
            lines.append(f"- **{key}**: {json.dumps(value)}")
        lines += [f"- **sha256**: `{card.get('sha256', '')}`", ""]
    out = folder / "MODEL_CARD.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def load_network(name: str, config_cls, build, folder: Path | None = None):
    """(net, cfg, card): the card's config (JSON lists back to tuples) builds the network, then its weights load."""
    state, card = load_state(name, folder)
    cfg = config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in card["config"].items()})
    net = build(cfg)
    net.load_state_dict(state)
    return net, cfg, card
