"""`pathosyn synthesize | pseudo-healthy | demo | train` subcommands."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from ..errors import InputError
from ..outputs import check_output_folder


def _image_args(values: list[str]) -> dict:
    from ..labels import check_modality
    from ..volume import read_volume

    images = {}
    for item in values or []:
        if "=" not in item:
            raise InputError(f"--image expects MOD=PATH (e.g. t1=scan.nii.gz), got '{item}'")
        mod, path = item.split("=", 1)
        mod = check_modality(mod)
        if mod in images:
            raise InputError(f"modality '{mod}' given twice")
        images[mod] = read_volume(path, segmentation=False)
    if not images:
        raise InputError("give at least one --image MOD=PATH")
    return images


def write_text_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_json_atomic(payload: dict, path: Path) -> None:
    write_text_atomic(json.dumps(payload, indent=2), path)


OUTPUT_FORMATS = ("nii.gz", "nrrd", "nii")


def write_synthesis(result, out: Path, fmt: str = "nii.gz", crop: bool = False) -> dict:
    """DIR/<MOD>.<fmt>, residual_<MOD>, uncertainty_<MOD> (K>1), mask, report.json (fmt: nii.gz, nrrd or nii).
    Atomic per file; report.json is written last, so its presence marks a complete output folder.
    crop=True writes only the lesion ROI box of every output (geometry kept; report["outputs_box_zyx"] gives its
    voxel range): outside it the images equal the input and the residual, uncertainty and mask are 0, so a front
    end that has the input pastes the box back (a 64^3 box instead of a whole head: 0.5-1 s less per click). A scan
    on a grid of its own (resampled for the engine) has its box in report["outputs_box_zyx_by_modality"]."""
    from ..preprocess import RoiBox, bounding_box
    from ..volume import write_volume

    report = dict(result.report)
    boxes = {m: None for m in result.images} | {"mask": None}
    if crop:
        box, _ = RoiBox(tuple(report["roi_start_zyx"]), tuple(report["roi_size_zyx"])).paste_slices(
            result.mask.shape)
        report["outputs_box_zyx"] = [[b.start, b.stop] for b in box]
        own = {}  # scans on grids of their own: the box of what changed there
        for m, vol in result.images.items():
            if vol.same_grid(result.mask):
                boxes[m] = box
                continue
            changed = result.residuals[m].array != 0
            if result.uncertainty:
                changed |= result.uncertainty[m].array != 0
            boxes[m] = bounding_box(changed) or (slice(0, 1),) * 3
            own[m] = [[b.start, b.stop] for b in boxes[m]]
        boxes["mask"] = box
        if own:
            report["outputs_box_zyx_by_modality"] = own

    def write(volume, name: str, box) -> str:
        return str(write_volume(volume.crop(box) if box is not None else volume, out / f"{name}.{fmt}"))

    files = {}
    for m, vol in result.images.items():
        files[m] = write(vol, m, boxes[m])
        files[f"residual_{m}"] = write(result.residuals[m], f"residual_{m}", boxes[m])
        if result.uncertainty:
            files[f"uncertainty_{m}"] = write(result.uncertainty[m], f"uncertainty_{m}", boxes[m])
    files["mask"] = write(result.mask, "mask", boxes["mask"])
    write_json_atomic({**report, "files": files}, out / "report.json")
    return files


def cmd_synthesize(args) -> int:
    from ..cli import Progress
    from ..volume import read_volume
    from .api import synthesize_lesion

    check_output_folder(args.out)  # before the work, not after it
    progress = Progress(args.progress)
    images = _image_args(args.image)
    mask = read_volume(args.mask)
    brain = read_volume(args.brain_mask) if args.brain_mask else None
    result = synthesize_lesion(images, mask, seed=args.seed, samples=args.samples, steps=args.steps,
                               guidance=args.guidance, device=args.device, base=args.base,
                               whole_lesion=True if args.whole_lesion else None, progress=progress,
                               population_pull=args.population_pull, texture_match=not args.keep_base_texture,
                               brain_mask=brain)
    files = write_synthesis(result, Path(args.out), args.format, crop=args.crop_outputs)
    progress.done(outputs=files, report=result.report)
    return 0


def cmd_pseudo_healthy(args) -> int:
    from ..cli import Progress
    from ..volume import read_volume, write_volume
    from .api import pseudo_healthy

    check_output_folder(args.out)
    progress = Progress(args.progress)
    images = _image_args(args.image)
    brain = read_volume(args.brain_mask) if args.brain_mask else None
    healthy = pseudo_healthy(images, read_volume(args.mask), device=args.device, progress=progress, seed=args.seed,
                             scanner_noise=not args.smooth, brain_mask=brain)
    files = {m: str(write_volume(v, Path(args.out) / f"{m}.{args.format}")) for m, v in healthy.items()}
    progress.done(outputs=files)
    return 0


def cmd_demo(args) -> int:
    from ..cli import Progress
    from .demo import run_demo

    check_output_folder(args.out)
    progress = Progress(args.progress)
    files = run_demo(Path(args.out), seed=args.seed, samples=args.samples, steps=args.steps, device=args.device,
                     progress=progress)
    progress.done(outputs=files)
    return 0


def positive_int(text: str) -> int:
    """An argparse type for counts of at least 1 (ValueError is its one-line error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def channel_list(text: str) -> tuple[int, ...]:
    """'32,64,128' -> (32, 64, 128): positive widths (an argparse type; ValueError is its one-line error)."""
    widths = tuple(int(part) for part in text.split(","))
    if not widths or min(widths) < 1:
        raise ValueError(text)
    return widths


def cmd_train(args) -> int:
    work = Path(args.work)
    crop = {"crop": args.crop} if args.crop else {}  # else each trainer's own default
    if args.model == "anatomy":
        from .train_anatomy import train_anatomy

        train_anatomy(work / "anatomy", steps=args.steps, batch=args.batch or 4, seed=args.seed,
                      data_root=args.data, out_dir=args.weights_out, threads=args.threads,
                      max_minutes=args.max_minutes, from_scratch=args.from_scratch, channels=args.channels,
                      validation_holes=args.validation_holes, **crop)
    else:
        from .train_deviation import train_deviation

        folder = "deviation" if args.variant == "pathosyn" else f"deviation_{args.variant}"
        train_deviation(work / folder, cache=work / "deviation" / "cache", steps=args.steps,
                        batch=args.batch or 4, seed=args.seed, data_root=args.data,
                        out_dir=args.weights_out, threads=args.threads,
                        max_minutes=args.max_minutes, variant=args.variant, **crop,
                        from_scratch=args.from_scratch, select=args.select, realism_every=args.realism_every)
    return 0


def cmd_calibrate(args) -> int:
    """Fit a card's calibration on the training fold: the anatomy card's `fill_smoothing` (with the weights in
    --weights), or the deviation card's population levels (offsets from the tissue ring around each lesion)."""
    from ..cases import default_data_root
    from ..folds import make_folds
    from ..weights import load_card, weights_dir, write_card

    folder = Path(args.weights) if args.weights else weights_dir()
    root = Path(args.data or default_data_root())
    cases = make_folds(str(root)).train
    if args.model == "deviation":
        return _calibrate_levels(cases, root, folder)
    from .anatomy import WEIGHTS_NAME
    from .calibration import fill_smoothing_holes, fit_fill_smoothing

    card = load_card(WEIGHTS_NAME, folder)
    holes = fill_smoothing_holes(cases, root, device=args.device, weights=folder,  # the inpainter calibrated
                                 on_hole=lambda h: print(f"{h['case']}: {'lesion-sized' if h['large'] else 'small'} "
                                                         "hole", flush=True))
    if not holes:
        raise InputError(f"no inpainting problems could be built from the training fold of {root}")
    fit = fit_fill_smoothing(holes)
    card["fill_smoothing"] = {**fit, "data": f"training fold ({len(cases)} cases): 2 healthy-tissue ellipsoids and "
                              "the tumour mirrored into the healthy hemisphere per case, every modality, z-units",
                              "weights_sha256": card.get("sha256"),
                              "used_by": "pseudo_healthy (lesion removal); the base a lesion is synthesized on keeps "
                                         "the network's fill"}
    write_card(WEIGHTS_NAME, card, folder)
    print(json.dumps({k: fit[k] for k in ("setting", "fitted", "raw_fill", "holes")}), flush=True)
    return 0


def _calibrate_levels(cases, root: Path, folder: Path) -> int:
    """The deviation card's `population_levels` as offsets from each case's level ring (training fold)."""
    from ..weights import load_card, write_card
    from .calibration import LEVEL_RING_MM, level_entries
    from .deviation import WEIGHTS_NAME

    card = load_card(WEIGHTS_NAME, folder)
    used = []
    entries = level_entries(cases, root, on_case=lambda case_id, _: used.append(case_id))
    levels = entries["population_levels"]
    if not levels:
        raise InputError(f"no labelled case with sub-regions in the training fold of {root}")
    card.update(entries, population_levels_data=f"training fold ({len(used)} cases with sub-regions): "
                "voxel-weighted mean z-score of each sub-region minus the case's mean over the tissue "
                f"{LEVEL_RING_MM[0]:g}-{LEVEL_RING_MM[1]:g} mm around its lesion")
    write_card(WEIGHTS_NAME, card, folder)
    print(json.dumps({"population_levels": levels, "cases": len(used)}), flush=True)
    return 0


BRAIN_MASK_HELP = ("brain mask (non-zero = brain; any grid): normalise intensities over the brain, as the models "
                   "learned, on scans with scalp and skull")


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_common

    p = sub.add_parser("synthesize", help="add a synthetic lesion to healthy scan(s)")
    p.add_argument("--image", action="append", required=True, metavar="MOD=PATH", help="repeat per modality")
    p.add_argument("--mask", required=True, help="lesion mask (canonical 0-3, BraTS labels, or binary)")
    p.add_argument("--brain-mask", default=None, metavar="PATH", help=BRAIN_MASK_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1, help="K > 1 also writes the per-voxel std (uncertainty)")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps (default from the model card; 2 = quick preview)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance strength (1 = off)")
    p.add_argument("--base", choices=["input", "pseudo-healthy"], default="input",
                   help="anatomy base: the (healthy) input itself, or a pseudo-healthy version of it")
    p.add_argument("--whole-lesion", action="store_true", help="ignore sub-region labels; the model invents them")
    p.add_argument("--population-pull", type=float, default=None, metavar="0..1",
                   help="move each sub-region's mean level towards the training population's by this fraction "
                        "(0 = as sampled, most diverse; 1 = the population mean; default: the weights' card)")
    p.add_argument("--keep-base-texture", action="store_true",
                   help="keep the base's healthy fine texture inside the lesion (default: attenuated to the training "
                        "population's lesion/healthy ratio per modality, the weights' card `population_texture`)")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="nii.gz", help="output file format")
    p.add_argument("--crop-outputs", action="store_true",
                   help="write only the lesion ROI box of each output, with its geometry (report.json: "
                        "outputs_box_zyx); outside it the images equal the input: for front ends that paste it back")
    add_common(p)
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("pseudo-healthy", help="remove a lesion: fill the mask with healthy tissue")
    p.add_argument("--image", action="append", required=True, metavar="MOD=PATH")
    p.add_argument("--mask", required=True)
    p.add_argument("--brain-mask", default=None, metavar="PATH", help=BRAIN_MASK_HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="nii.gz", help="output file format")
    p.add_argument("--seed", type=int, default=0, help="seed of the scan noise given to the fill")
    p.add_argument("--smooth", action="store_true",
                   help="leave the fill smooth (the network's expected tissue, without the scan's noise)")
    add_common(p)
    p.set_defaults(func=cmd_pseudo_healthy)

    p = sub.add_parser("demo", help="MNI152 T1 + built-in lesion -> NIfTI outputs + PNG figure")
    p.add_argument("--out", default="pathosyn_demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train the PathoSyn anatomy or deviation model (resumable)")
    p.add_argument("model", choices=["anatomy", "deviation"])
    p.add_argument("--work", default=".train", help="checkpoints, caches and loss logs")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--data", default=None, help="cases folder root (default ../shared/data)")
    p.add_argument("--weights-out", type=Path, default=None, help="default: scripted_models/weights")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variant", choices=["pathosyn", "holistic", "mask_only"], default="pathosyn",
                   help="deviation only: the PathoSyn model or an ablation baseline for `pathosyn evaluate`")
    p.add_argument("--crop", type=positive_int, default=None,
                   help="training crop side in voxels (default 48 for deviation, 64 for anatomy)")
    p.add_argument("--channels", type=channel_list, default=None, metavar="C1,...,C5",
                   help="anatomy only: the U-Net's width per level (default 16,32,64,128,128); another size "
                        "trains from scratch")
    p.add_argument("--validation-holes", type=positive_int, default=None, metavar="N",
                   help="anatomy only: healthy-tissue holes per validation-fold case that select the weights "
                        "(default 4)")
    p.add_argument("--from-scratch", action="store_true",
                   help="do not continue from the bundled weights")
    p.add_argument("--select", choices=["loss", "realism"], default="loss",
                   help="deviation only: keep the weights with the lowest validation-fold denoising loss, or with "
                        "the highest validation-fold realism pass fraction (synthesizes the fold every "
                        "--realism-every steps)")
    p.add_argument("--realism-every", type=int, default=400,
                   help="deviation with --select realism: steps between two realism checks (a multiple of 200)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("calibrate", help="fit a card's calibration on the training fold: anatomy -> the "
                                         "inpainter's fill smoothing (`fill_smoothing`); deviation -> the "
                                         "population lesion levels (`population_levels`)")
    p.add_argument("model", choices=["anatomy", "deviation"])
    p.add_argument("--weights", default=None, help="folder with the weights (default: the bundled ones)")
    p.add_argument("--data", default=None, help="cases folder root (default ../shared/data)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_calibrate)
