"""`pathosyn sample` and `pathosyn train-pathar` (registered by scripted_models.cli)."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

STAGES = ("structure", "appearance", "transformer")  # "all" runs these, in order
FINE_TUNES = ("decoder", "joint")  # run on trained weights only when asked: --stage decoder / joint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default=".train/pathar", help="checkpoints, logs and the patch cache")
    parser.add_argument("--stage", default="all", choices=("all",) + STAGES + FINE_TUNES,
                        help="decoder: fine-tune the appearance decoder of the weights in --out with their tokens "
                             "kept (the transformer stays valid); joint: add a cross-modal refinement of the "
                             "modalities decoded together, everything else frozen")
    parser.add_argument("--steps", type=int, default=None, help="steps of the selected single stage")
    parser.add_argument("--structure-steps", type=int, default=None)
    parser.add_argument("--appearance-steps", type=int, default=None)
    parser.add_argument("--transformer-steps", type=int, default=None)
    parser.add_argument("--decoder-steps", type=int, default=None)
    parser.add_argument("--joint-steps", type=int, default=None)
    parser.add_argument("--decoder-adversarial-weight", type=float, default=None, metavar="W",
                        help="decoder stage: add a patch discriminator whose gradient on the decoder's last layer is "
                             "W x the reconstruction's (VQGAN-style; default 0 = none)")
    parser.add_argument("--vq-batch", type=int, default=None)
    parser.add_argument("--transformer-batch", type=int, default=None)
    parser.add_argument("--out", default=None, help="weights folder (default: the bundled scripted_models/weights)")
    parser.add_argument("--data", default=None, help="data root (default ../shared/data or PATHOSYN_DATA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-check", type=int, default=8, help="samples scored into the card (0 = none)")
    parser.add_argument("--transformer-init", default=None, metavar="FOLDER",
                        help="warm-start the transformer from the weights in FOLDER (same tokenizers)")
    parser.add_argument("--anchor-share", type=float, default=None, metavar="P",
                        help="share of transformer rows trained to follow another modality's row of the same patch "
                             "(adds anchor conditioning; sampling then draws the anatomy modality first)")
    parser.add_argument("--transformer-lr", type=float, default=None, metavar="LR",
                        help="the transformer's peak learning rate (default 6e-4; lower for a warm-started run)")
    parser.add_argument("--transformer-select", choices=("best_val", "last"), default="best_val",
                        help="keep the transformer weights with the lowest held-out NLL (checked every save) "
                             "or the last ones")
    parser.add_argument("--elastic-per-case", type=int, default=None, metavar="N",
                        help="deformed (new-shape) patches per training case on top of the rigid ones "
                             "(default 48; 0 = rigid augmentation only)")
    parser.add_argument("--blend-per-case", type=int, default=None, metavar="N",
                        help="structure-only blends of each training lesion with another one, for the transformer's "
                             "structure stream (default 0)")
    parser.add_argument("--split", choices=("validation_case", "folds"), default=None,
                        help="held-out cases: the earlier single validation case, or the case-level folds of "
                             "scripted_models/folds.py (validation fold selects the weights, test fold left out)")
    parser.add_argument("--lesion-masks", action="store_true",
                        help="add the mask-only lesions of DATA/lesion_masks/ as structure-only training cases")
    parser.add_argument("--augment-per-case", type=int, default=None, metavar="N",
                        help="rigid patches per training case (default 32)")
    parser.add_argument("--pseudo-labels", action="store_true",
                        help="also train on the unlabelled case(s) given rule-based pseudo-labels "
                             "(aurora_met_unlabelled; measured, not better: see README)")



def register(subparsers) -> None:
    from ..cli import add_common

    p = subparsers.add_parser("sample", help="PathAR: sample lesion masks with matching images",
                              description="Sample N lesion structures, each rendered in every requested modality: "
                                          "DIR/sample_000/{mask.nii.gz, <MOD>.nii.gz ..., done.json}, written as "
                                          "they are drawn.")
    p.add_argument("--modality", action="append", required=True, metavar="MOD",
                   help="t1, t1c, t2 or flair; repeat for several")
    p.add_argument("--n", type=int, default=1, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--modality-guidance", default=None, metavar="W|MOD=W,...",
                   help="push each modality's appearance away from the modality average: one weight, or some "
                        "modalities' weights, e.g. flair=1 (0 = plain sampling; default: the weights' card)")
    p.add_argument("--anatomy-from", default="card", metavar="MOD|none",
                   help="every modality of a sample shares MOD's head and brain: MOD is drawn first and the others "
                        "follow it (or copy its tokens outside the lesion, with weights not trained to follow); "
                        "none = each modality draws its own (default: the weights' card)")
    p.add_argument("--resume", action="store_true",
                   help="keep the samples in --out that were finished with these settings (their done.json "
                        "verifies) and draw the rest; --n may grow")
    add_common(p)
    p.set_defaults(func=run_sample)

    t = subparsers.add_parser("train-pathar", help="PathAR: train the tokenizers and the transformer (resumable)")
    add_arguments(t)
    add_common(t)
    t.set_defaults(func=run_train)


def _progress(args):
    from ..cli import Progress

    return Progress(args.progress)


def sample_to_folder(out: Path, modalities, n: int, seed: int, resume: bool = False,
                     progress: Callable[[float, str], None] | None = None, chunk: int | None = None,
                     **options) -> dict:
    """OUT/sample_XXX/{mask, <mod>}.nii.gz plus done.json (settings and checksums, written last). Every argument is
    checked before the first file is written; then each chunk of samples is written as soon as it is drawn (each
    file atomic), so an interrupted run keeps what it finished. resume: samples whose done.json verifies for these
    settings are kept and the rest drawn: the same bytes as an uninterrupted run. options: SampleRun's.
    Returns {"out", "samples", "modalities", "kept"}."""
    from ..outputs import DONE, check_output_folder, fingerprint, outputs_record, verify_done
    from ..pathosyn.commands import write_json_atomic
    from ..volume import write_volume
    from .api import CHUNK, SampleRun

    out = check_output_folder(out)
    run = SampleRun(modalities, n, seed, chunk=chunk or CHUNK, **options)
    key = fingerprint(run.settings)

    def folder(i: int) -> Path:
        return out / f"sample_{i:03d}"

    kept = {i for i in range(run.n) if resume and verify_done(folder(i), key)}
    for pairs in run.chunks(skip=lambda indices: kept.issuperset(indices), progress=progress):
        for pair in (p for p in pairs if p.index not in kept):  # a chunk is redrawn whole, its kept samples stay
            target = folder(pair.index)
            (target / DONE).unlink(missing_ok=True)
            files = {"mask": "mask.nii.gz", **{m: f"{m}.nii.gz" for m in pair.images}}
            for stale in target.glob("*.nii.gz"):  # another run's modality would pass for this sample's
                if stale.name not in files.values():
                    stale.unlink()
            write_volume(pair.mask, target / files["mask"])
            for mod, vol in pair.images.items():
                write_volume(vol, target / files[mod])
            write_json_atomic({"index": pair.index, "fingerprint": key, "settings": run.settings,
                               "outputs": outputs_record(target, files)}, target / DONE)
    return {"out": str(out), "samples": [str(folder(i)) for i in range(run.n)], "modalities": run.modalities,
            "kept": len(kept)}


def run_sample(args: argparse.Namespace) -> int:
    from .api import parse_modality_guidance

    guidance = None if args.modality_guidance is None else parse_modality_guidance(args.modality_guidance)
    progress = _progress(args)
    result = sample_to_folder(Path(args.out), args.modality, args.n, args.seed, resume=args.resume,
                              progress=progress, temperature=args.temperature, top_k=args.top_k, device=args.device,
                              modality_guidance=guidance, anatomy_from=args.anatomy_from)
    progress.done(**result, seed=args.seed)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from .train import config_from_args, model_config_from_args, train

    progress = _progress(args)
    result = train(Path(args.work), args.stage, config_from_args(args), model_config_from_args(args),
                   out_dir=args.out and Path(args.out),
                   data_root=args.data, device=args.device, threads=args.threads, progress=progress,
                   sample_check=args.sample_check)
    progress.done(**result)
    return 0
