"""PathAR sampling API: lesion masks with matching images in any set of modalities.

    from scripted_models import sample_pairs
    pairs = sample_pairs(["t1c", "flair"], n=4, seed=0)
    pairs[0].mask.array      # (64, 64, 64) uint8 canonical labels, spacing = patch spacing (2 mm)
    pairs[0].images["t1c"]   # Volume, float32 z-scores

Randomness: sample i draws its structure from Gumbel noise seeded by (seed, i) and each modality's appearance
from (seed, i, modality). The same arguments give identical output, and sample i's structure does not depend on
n or on which modalities are requested (up to floating-point ties). With a shared anatomy (`anatomy_from`) the
anchor modality's row is drawn first, from its own noise; weights trained to follow an anchor row
(IARConfig.anchor_conditioning) then draw every other modality seeing the anchor's tokens, older weights copy the
anchor's tokens outside the lesion.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, WeightsError
from ..labels import MODALITIES, check_modality
from ..runtime import pick_device, pin_cpu_inference
from ..volume import Volume
from . import ANATOMY_CARD, ANATOMY_INDEPENDENT, HEAD_MARGIN_Z
from .tokenizer import AppearanceVQ, StructureVQ, VQConfig
from .transformer import (
    IARConfig,
    IARTransformer,
    SharedAnatomy,
    sample_appearance,
    sample_following,
    sample_joint,
    sample_structure,
    seeded_gumbel_noise,
)

STRUCTURE_NAME, APPEARANCE_NAME, TRANSFORMER_NAME = "pathar_structure_vq", "pathar_appearance_vq", "pathar_transformer"
WEIGHT_NAMES = (STRUCTURE_NAME, APPEARANCE_NAME, TRANSFORMER_NAME)
CHUNK = 8  # samples generated together (memory of the KV caches grows with samples x modalities)
# torch threads of the token loop. Measured 2026-12-03 (one sample, 4 modalities, 2 cores, tcmalloc), 1 / 2 threads:
# bundled weights 3.24 / 2.23 s; modality guidance 8 (4x the appearance rows) 5.39 / 4.47 s. (An earlier, smaller
# model was faster on 1 thread.)
AR_THREADS = 2

_MODELS: dict[tuple, PathAR] = {}


ModalityGuidance = float | Mapping[str, float]  # one weight for every modality, or {modality: weight}
CARD_DEFAULT, INDEPENDENT = ANATOMY_CARD, ANATOMY_INDEPENDENT  # anatomy_from values (package docstring)


def check_anatomy_from(value, modalities: list[str]) -> str | None:
    """anatomy_from -> the anchor modality, or None for independent rows; InputError when invalid."""
    if value is None or value == INDEPENDENT:
        return None
    if not isinstance(value, str) or value not in modalities:
        raise InputError(f"anatomy_from must be one of {', '.join(modalities)} or '{INDEPENDENT}', got {value!r}")
    return value


def lesion_fractions(masks: torch.Tensor, downsample: int) -> torch.Tensor:
    """(B, *S) labels -> (B, N) float: the share of each token cell's voxels that are lesion (row-major, as the
    token grid)."""
    pool = getattr(torch.nn.functional, f"avg_pool{masks.dim() - 1}d")
    return pool((masks > 0).float()[:, None], downsample).flatten(1)


LESION_FRACTION = "fraction"  # sampling.guidance_in_lesion: guidance weighted by each cell's lesion share


def one_head_outline(images: np.ndarray, masks: np.ndarray, background_z: float) -> np.ndarray:
    """images (B, M, *S) of B samples in M modalities, masks (B, *S) -> the same with one head outline per sample:
    outside the lesion, a voxel that any modality draws as background is background in all of them (a scan has one
    head; modalities decoded from their own tokens draw their own outlines)."""
    head = (images > background_z + HEAD_MARGIN_Z).all(1) | (masks > 0)  # (B, *S)
    return np.where(head[:, None], images, np.float32(background_z)).astype(np.float32)


def _guidance_weight(w, shown) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float, np.number)) or not np.isfinite(w) or w < 0:
        raise InputError(f"modality guidance must be a number >= 0 or {{modality: number >= 0}}, got {shown!r}")
    return float(w)


def per_modality_guidance(value, modalities: list[str]) -> dict[str, float]:
    """A guidance number or {modality: weight} -> {modality: weight} for `modalities`; InputError when invalid."""
    if isinstance(value, Mapping):
        return {check_modality(m): _guidance_weight(w, value) for m, w in value.items()}
    weight = _guidance_weight(value, value)
    return {m: weight for m in modalities}


def parse_modality_guidance(text: str) -> ModalityGuidance:
    """Command-line guidance: "8" (every modality) or "t1=8,t2=4,flair=1" (those modalities)."""
    def number(item: str) -> float:
        try:
            return float(item)
        except ValueError:
            raise InputError(f"modality guidance must be W or MOD=W,MOD=W... with numbers W >= 0, got {text!r}") \
                from None

    if "=" not in text:
        return _guidance_weight(number(text), text)
    pairs = [item.partition("=") for item in text.split(",")]
    return per_modality_guidance({m.strip(): number(w) for m, _, w in pairs}, [])


def describe_guidance(guidance: dict[str, float]) -> str:
    """{modality: weight} -> "8" when all are equal, else "t1 8, t1c 8, t2 4, flair 1"."""
    if len(set(guidance.values())) == 1:
        return f"{next(iter(guidance.values())):g}"
    return ", ".join(f"{m} {w:g}" for m, w in guidance.items())


@dataclass
class SamplePair:
    mask: Volume  # uint8 canonical labels 0..3
    images: dict[str, Volume] = field(default_factory=dict)  # float32 z-scores, same grid as the mask
    index: int = 0
    seed: int = 0


class PathAR:
    """The three loaded networks plus what their cards say about the patch grid."""

    def __init__(self, structure: StructureVQ, appearance: AppearanceVQ, transformer: IARTransformer, cards: dict,
                 device: torch.device):
        self.structure, self.appearance, self.transformer = structure, appearance, transformer
        self.cards, self.device = cards, device
        for net in (structure, appearance, transformer):
            pin_cpu_inference(net, channels_last=True)
        card = cards[TRANSFORMER_NAME]
        self.spacing = float(card["patch"]["spacing_mm"])
        self.patch = (int(card["patch"]["size"]),) * structure.cfg.spatial_dims
        self.modalities = list(card.get("modalities", MODALITIES))
        self.grid = tuple(transformer.cfg.grid)
        # the weights' recommended modality guidance (chosen on the validation fold; absent = plain sampling)
        try:  # a map may leave modalities out: those sample plainly
            self.modality_guidance = {m: 0.0 for m in self.modalities} | per_modality_guidance(
                card.get("sampling", {}).get("modality_guidance", 0.0), self.modalities)
            # shared anatomy (shared_anatomy_tokens): the modality whose head and brain the others share
            self.anatomy_from = check_anatomy_from(card.get("sampling", {}).get("anatomy_from"), self.modalities)
        except InputError as exc:
            raise WeightsError(f"{TRANSFORMER_NAME} card: {exc}") from None
        self.lesion_guidance = self._lesion_guidance(card)
        # one head outline for the modalities of a sample (card sampling.one_head_outline, default no)
        self.one_head_outline = bool(card.get("sampling", {}).get("one_head_outline", False))
        self.background_z = float(card["patch"].get("background_z", -4.0))

    def _lesion_guidance(self, card: dict) -> bool | str:
        """Where rows that follow an anchor row are guided (the card's `sampling.guidance_in_lesion`): False =
        everywhere (the default), True = only in token cells holding lesion, "fraction" = there with the weight
        times the cell's lesion share. Modality guidance amplifies what sets the label apart and drowns the anchor's
        anatomy, which all labels share; and a whole 16 mm cell guided for a lesion at its edge draws a halo."""
        value = card.get("sampling", {}).get("guidance_in_lesion", False)
        if value not in (False, True, LESION_FRACTION):
            raise WeightsError(f"{TRANSFORMER_NAME} card: sampling.guidance_in_lesion must be true, false or "
                               f"{LESION_FRACTION!r}, got {value!r}")
        return value if self.transformer.cfg.anchor_conditioning else False

    def guidance(self, override: ModalityGuidance | None = None) -> dict[str, float]:
        """{modality: weight} a sampling call uses: the weights' default, with `override` (one number for every
        modality, or some modalities' weights) on top."""
        if override is None:
            return dict(self.modality_guidance)
        if isinstance(override, Mapping):
            return {**self.modality_guidance, **per_modality_guidance(override, list(override))}
        return per_modality_guidance(override, self.modalities)

    @classmethod
    def load(cls, device: torch.device, folder: Path | None = None) -> PathAR:
        from ..weights import load_state

        states, cards = {}, {}
        for name in WEIGHT_NAMES:
            states[name], cards[name] = load_state(name, folder)
        try:
            structure = StructureVQ(VQConfig.from_dict(cards[STRUCTURE_NAME]["config"]))
            appearance = AppearanceVQ(VQConfig.from_dict(cards[APPEARANCE_NAME]["config"]))
            transformer = IARTransformer(IARConfig.from_dict(cards[TRANSFORMER_NAME]["config"]))
            structure.load_state_dict(states[STRUCTURE_NAME])
            appearance.load_state_dict(states[APPEARANCE_NAME])
            transformer.load_state_dict(states[TRANSFORMER_NAME])
            for vq_name, key in ((STRUCTURE_NAME, "structure_vq"), (APPEARANCE_NAME, "appearance_vq")):
                expected = cards[TRANSFORMER_NAME].get(key, {}).get("sha256")
                if expected and expected != cards[vq_name]["sha256"]:
                    raise WeightsError(f"{TRANSFORMER_NAME} was trained on a different {vq_name} "
                                       f"(sha256 {expected[:12]}... != {cards[vq_name]['sha256'][:12]}...)")
        except (KeyError, TypeError, RuntimeError) as exc:
            if isinstance(exc, WeightsError):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(f"PathAR weights do not match their model cards: {first}") from None
        return cls(structure.to(device).eval(), appearance.to(device).eval(), transformer.to(device).eval(), cards,
                   device)

    @torch.inference_mode()
    def decode_images(self, a_tokens: torch.Tensor, masks: torch.Tensor, modalities: list[str]) -> np.ndarray:
        """Appearance tokens (B*M, N) of B masks (B, *S) in M modalities, structure-major -> images (B*M, *S),
        refined across the modalities when the weights have a joint refinement, with one head outline per sample
        when the card asks for it (one_head_outline)."""
        M = len(modalities)
        vq_modality = torch.tensor([MODALITIES.index(m) for m in modalities] * masks.shape[0], device=self.device)
        images = self.appearance.decode_together(a_tokens.view(-1, *self.grid), masks, vq_modality)
        images = images[:, 0].float().cpu().numpy()
        if self.one_head_outline and M > 1:
            B = masks.shape[0]
            images = one_head_outline(images.reshape(B, M, *images.shape[1:]), masks.cpu().numpy(),
                                      self.background_z).reshape(images.shape)
        return images

    def anchor_modality(self, anatomy_from: str | None = CARD_DEFAULT) -> str | None:
        """anatomy_from ("card", "none"/None or a modality) -> the modality drawn first, or None for independent
        rows; InputError when invalid."""
        return self.anatomy_from if anatomy_from == CARD_DEFAULT else check_anatomy_from(anatomy_from,
                                                                                         self.modalities)

    @property
    def copies_anatomy(self) -> bool:
        """Whether a shared anatomy copies the anchor's tokens outside the lesion: always for a transformer not
        trained to follow an anchor row, else as the card's `sampling.anatomy_copy` says (default no)."""
        return not self.transformer.cfg.anchor_conditioning or \
            bool(self.cards[TRANSFORMER_NAME].get("sampling", {}).get("anatomy_copy", False))

    @property
    def guides_lesion_only(self) -> bool:
        """Whether followers are guided only in the lesion's cells (lesion_guidance, either form)."""
        return bool(self.lesion_guidance)

    def shared_anatomy_tokens(self, s_cache, masks: torch.Tensor, modality: torch.Tensor, noise, anchor: str,
                              temperature: float = 1.0, top_k: int | None = None, guidance=0.0, callback=None,
                              copy: bool | None = None, lesion_guidance: bool | str | None = None) -> torch.Tensor:
        """Appearance tokens (S*R, N) whose rows share the anchor modality's anatomy, given the structure cache: a
        transformer trained to follow an anchor row draws the anchor first and the others after it
        (sample_following); copy: rows take the anchor's tokens outside the lesion's cells (SharedAnatomy; None =
        copies_anatomy); lesion_guidance: rows are guided only in the lesion's cells, True at full weight, "fraction"
        at the weight times the cell's lesion share (None = the card's, lesion_guidance)."""
        label = self.modalities.index(anchor)
        follow = self.transformer.cfg.anchor_conditioning
        copy = self.copies_anatomy if copy is None else copy
        lesion_guidance = self.lesion_guidance if lesion_guidance is None else lesion_guidance
        share = lesion_fractions(masks, self.structure.cfg.downsample)  # (S, N)
        cells = share > 0
        shared = SharedAnatomy.from_lesion_cells(cells, modality, label) if copy else None
        if follow:
            guided = None
            if lesion_guidance:
                guided = (share if lesion_guidance == LESION_FRACTION else cells).repeat_interleave(
                    modality.shape[0] // cells.shape[0], 0)  # (S*R, N)
            return sample_following(self.transformer, s_cache, modality, noise, label, temperature, top_k, callback,
                                    guidance, shared, guided)
        return sample_appearance(self.transformer, s_cache, modality, noise, temperature, top_k, callback, guidance,
                                 shared)

    @torch.inference_mode()
    def generate(self, modalities: list[str], indices: list[int], seed: int, temperature: float,
                 top_k: int | None, progress: Callable | None = None, done: float = 0.0, share: float = 1.0,
                 guidance: ModalityGuidance | None = None, anatomy_from: str | None = CARD_DEFAULT):
        """SamplePairs for sample indices `indices` (one batch); guidance None = the weights' default;
        anatomy_from CARD_DEFAULT = the weights' default, None = independent modality rows."""
        cfg = self.transformer.cfg
        B, M, N = len(indices), len(modalities), cfg.positions
        weights = self.guidance(guidance)
        anchor = self.anchor_modality(anatomy_from)

        def noise(i: int, stream: int, vocab: int) -> torch.Tensor:
            return seeded_gumbel_noise([seed, i, stream], (N, vocab))

        def report(part: float, message: str):
            if progress is not None:
                progress(min(1.0, done + share * part), message)

        report(0.0, "sampling tokens")
        s_noise = torch.stack([noise(i, 0, cfg.structure_vocab) for i in indices])  # (B, N, Vs)
        # one row per (sample, modality): the structure cache is shared, the modality label differs; a shared
        # anatomy's anchor modality is drawn even when it is not requested
        row_modalities = modalities + ([anchor] if anchor and anchor not in modalities else [])
        R = len(row_modalities)
        rows = [(b, m) for b in range(B) for m in row_modalities]
        mod_index = torch.tensor([self.modalities.index(m) for _, m in rows])
        a_noise = torch.stack([noise(indices[b], 1 + MODALITIES.index(m), cfg.appearance_vocab) for b, m in rows])
        label_weights = [weights[m] for m in self.modalities]
        every = max(1, N // 20)
        # copying, or guiding only the lesion, needs the lesion's cells first
        pipelined = anchor is None or not (self.copies_anatomy or self.guides_lesion_only)
        with _cpu_threads(self.device, AR_THREADS):
            if pipelined:  # structure and appearance tokens (the followers one slot behind the anchor row)
                s_tokens, a_tokens = sample_joint(
                    self.transformer, s_noise, mod_index, a_noise, temperature=temperature, top_k=top_k,
                    guidance=label_weights, anchor_label=None if anchor is None else self.modalities.index(anchor),
                    callback=lambda j, n: j % every == 0 and report(0.9 * j / n, "sampling tokens"))
            else:  # the lesion's cells must be known before the appearance: structure first
                s_tokens, s_cache = sample_structure(
                    self.transformer, s_noise, temperature=temperature, top_k=top_k,
                    callback=lambda j, n: j % every == 0 and report(0.3 * j / n, "sampling the lesion"))
                masks = self.structure.decode_mask(s_tokens.view(B, *self.grid))  # (B, *S)
                a_tokens = self.shared_anatomy_tokens(
                    s_cache, masks, mod_index, a_noise, anchor, temperature, top_k, label_weights,
                    callback=lambda j, n: j % every == 0 and report(0.3 + 0.6 * j / n, "sampling the appearance"))
        a_tokens = a_tokens.view(B, R, N)[:, :M].reshape(B * M, N)  # the requested modalities come first
        report(0.92, "decoding")
        if pipelined:
            masks = self.structure.decode_mask(s_tokens.view(B, *self.grid))  # (B, *S)
        images = self.decode_images(a_tokens, masks, modalities)
        masks = masks.cpu().numpy()
        spacing = (self.spacing,) * 3
        out = []
        for b, i in enumerate(indices):
            vols = {m: Volume(np.ascontiguousarray(images[b * M + k], np.float32), spacing)
                    for k, m in enumerate(modalities)}
            out.append(SamplePair(Volume(np.ascontiguousarray(masks[b], np.uint8), spacing), vols, i, seed))
        report(1.0, "done")
        return out


@contextlib.contextmanager
def _cpu_threads(device: torch.device, n: int):
    """Run the token loop with at most n torch threads on CPU (AR_THREADS); the convolutional decoders keep the
    caller's setting."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _weights_key(folder: Path) -> tuple:
    stats = []
    for name in WEIGHT_NAMES:
        for ext in (".safetensors", ".json"):
            p = folder / f"{name}{ext}"
            st = p.stat() if p.is_file() else None
            stats.append((st.st_mtime_ns, st.st_size) if st else None)
    return tuple(stats)


def load_models(device: str | torch.device = "auto", folder: Path | None = None) -> PathAR:
    """Loaded models, cached per (device, weights folder, files' mtime/size): a changed file is re-verified."""
    from ..weights import weights_dir

    dev = device if isinstance(device, torch.device) else pick_device(device)
    folder = Path(folder or weights_dir()).resolve()
    key = (str(dev), str(folder), _weights_key(folder))
    if key not in _MODELS:
        for old in [k for k in _MODELS if k[:2] == key[:2]]:
            del _MODELS[old]
        _MODELS[key] = PathAR.load(dev, folder)
    return _MODELS[key]


def _check_args(modalities, n, seed, temperature, top_k, modality_guidance=None) -> list[str]:
    if isinstance(modalities, str):
        modalities = [modalities]
    if modalities is None or not isinstance(modalities, Iterable):
        raise InputError("modalities must be a modality name or a list of them")
    mods = []
    for m in modalities:
        key = check_modality(m)
        if key not in mods:
            mods.append(key)
    if not mods:
        raise InputError(f"no modality requested: expected one or more of {', '.join(MODALITIES)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise InputError(f"temperature must be a number > 0, got {temperature!r}") from None
    if not np.isfinite(temperature) or temperature <= 0:
        raise InputError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise InputError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if modality_guidance is not None:
        per_modality_guidance(modality_guidance, mods)
    return mods


class SampleRun:
    """One sampling call's checked arguments and loaded models; `chunks()` generates the samples a chunk at a time
    (indices chunk*k .. chunk*(k+1)-1), so callers can write each chunk as it completes. Raises InputError for bad
    arguments and WeightsError for missing or corrupted weights here, before any sample is drawn."""

    def __init__(self, modalities, n: int, seed: int, temperature: float = 1.0, top_k: int | None = None,
                 device: str = "auto", weights: Path | None = None, modality_guidance: ModalityGuidance | None = None,
                 anatomy_from: str | None = CARD_DEFAULT, chunk: int = CHUNK):
        self.modalities = _check_args(modalities, n, seed, temperature, top_k, modality_guidance)
        self.model = load_models(device, weights)
        missing = [m for m in self.modalities if m not in self.model.modalities]
        if missing:
            raise InputError(f"the PathAR weights do not know modality {', '.join(missing)}")
        self.n, self.seed, self.temperature, self.chunk = int(n), int(seed), float(temperature), int(chunk)
        self.top_k = None if top_k is None else int(top_k)
        self.guidance, self.anatomy_from = modality_guidance, anatomy_from
        anchor = self.model.anchor_modality(anatomy_from)  # checked here, not half-way through a run
        # what a sample's bytes depend on besides its index (resolved card defaults and the weights' checksums;
        # every modality's guidance, since an anchor row that is not requested is drawn too)
        self.settings = {
            "modalities": self.modalities, "seed": self.seed, "temperature": self.temperature, "top_k": self.top_k,
            "modality_guidance": self.model.guidance(modality_guidance), "anatomy_from": anchor,
            "chunk": self.chunk, "weights": {name: self.model.cards[name].get("sha256", "") for name in WEIGHT_NAMES},
            "card_sampling": self.model.cards[TRANSFORMER_NAME].get("sampling", {}),
        }

    def chunks(self, skip: Callable[[list[int]], bool] = lambda indices: False,
               progress: Callable[[float, str], None] | None = None):
        """Yield each chunk's SamplePairs, leaving out the chunks for which skip(indices) is true (progress spans
        the generated ones). A chunk holds the same samples whichever chunks are skipped."""
        every = [list(range(start, min(self.n, start + self.chunk))) for start in range(0, self.n, self.chunk)]
        todo = [indices for indices in every if not skip(indices)]
        total, done = max(1, sum(map(len, todo))), 0
        for indices in todo:
            yield self.model.generate(self.modalities, indices, self.seed, self.temperature, self.top_k, progress,
                                      done=done / total, share=len(indices) / total, guidance=self.guidance,
                                      anatomy_from=self.anatomy_from)
            done += len(indices)


def sample_pairs(modalities, n: int, seed: int, temperature: float = 1.0, top_k: int | None = None,
                 device: str = "auto", progress: Callable[[float, str], None] | None = None,
                 weights: Path | None = None, modality_guidance: ModalityGuidance | None = None,
                 anatomy_from: str | None = CARD_DEFAULT) -> list[SamplePair]:
    """Sample n lesion structures, each rendered in every requested modality.

    modalities: names from t1, t1c, t2, flair. Raises InputError for bad arguments and WeightsError for
    missing or corrupted weights (sha256 checked against the model cards). weights: a folder other than the
    bundled one (or PATHOSYN_WEIGHTS_DIR). modality_guidance: None = the weights' card default; a number for every
    modality or {modality: number} for some (0 = plain sampling; larger values push that modality's appearance
    away from the modality average). anatomy_from: "card" = the weights' default; a modality = every modality of
    a sample shares that modality's head and brain (PathAR.shared_anatomy_tokens); "none" = independent modality
    rows. For many samples, `pathar.commands.sample_to_folder` writes them as they come and resumes."""
    run = SampleRun(modalities, n, seed, temperature, top_k, device, weights, modality_guidance, anatomy_from)
    return [pair for chunk in run.chunks(progress=progress) for pair in chunk]
