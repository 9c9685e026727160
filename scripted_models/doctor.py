"""`pathosyn doctor`: is this installation ready? Versions, device, weights checksums, data folder, one verdict."""
from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

# distribution name -> minimum version the engine needs (pyproject.toml has the same floors)
REQUIRED = {"torch": "2.2", "monai": "1.4", "numpy": "1.22", "scipy": "1.8", "SimpleITK": "2.3", "nibabel": "4.0",
            "safetensors": "0.4", "einops": "0.6"}
OPTIONAL = {"nilearn": "teaching sample (MNI152 T1)", "dask": "batch --scheduler", "distributed": "Dask cluster",
            "slicer-core": "Slicer logic tests", "trame-slicer": "browser front end", "matplotlib": "figures",
            "scikit-learn": "evaluation", "pydicom": "DICOM SEG lesion masks"}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _at_least(found: str, floor: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(found.split("+")[0]) >= Version(floor)
    except InvalidVersion:
        return True


def checks(data_root: str | None = None) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Rows (topic, status, detail) and the list of problems that make the installation unusable."""
    from . import __version__

    rows, problems = [("pathosyn", "ok", __version__), ("python", "ok", platform.python_version())], []
    for dist, floor in REQUIRED.items():
        found = _version(dist)
        if found is None:
            rows.append((dist, "MISSING", f"needs >= {floor}"))
            problems.append(f"{dist} is not installed (needs >= {floor})")
        elif not _at_least(found, floor):
            rows.append((dist, "TOO OLD", f"{found}, needs >= {floor}"))
            problems.append(f"{dist} {found} is too old (needs >= {floor})")
        else:
            rows.append((dist, "ok", found))
    for dist, purpose in OPTIONAL.items():
        found = _version(dist)
        rows.append((dist, "ok" if found else "absent", f"{found or '-'} ({purpose})"))
    try:
        import torch

        from .runtime import native_cpu_bf16

        cuda = torch.cuda.is_available()
        device = f"cuda ({torch.cuda.get_device_name(0)})" if cuda else "cpu"
        from .worker import loaded_allocator

        rows.append(("device", "ok", f"{device}; {torch.get_num_threads()} CPU threads; native CPU bf16: "
                                     f"{native_cpu_bf16()}; allocator: {loaded_allocator()}"))
    except Exception as exc:  # noqa: BLE001 - a broken torch install is what this command reports
        rows.append(("device", "ERROR", str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
        problems.append("torch does not import")
    from .weights import load_card, sha256_of, weights_dir

    folder = weights_dir()
    for card_path in sorted(folder.glob("*.json")):
        name = card_path.stem
        weights = folder / f"{name}.safetensors"
        try:
            expected = load_card(name, folder).get("sha256")
        except Exception as exc:  # noqa: BLE001
            rows.append((f"weights {name}", "BAD CARD", str(exc)))
            problems.append(f"model card {name}.json is unreadable")
            continue
        if not weights.is_file():
            rows.append((f"weights {name}", "MISSING", str(weights)))
            problems.append(f"weights {name}.safetensors are missing")
        elif sha256_of(weights) != expected:
            rows.append((f"weights {name}", "CORRUPTED", "sha256 differs from the model card"))
            problems.append(f"weights {name}.safetensors are corrupted")
        else:
            rows.append((f"weights {name}", "ok", f"sha256 {expected[:16]}..."))
    from .cases import default_data_root

    root = Path(data_root) if data_root else default_data_root()
    cases = root / "cases"
    count = sum(1 for p in cases.iterdir() if (p / "case.json").is_file()) if cases.is_dir() else 0
    rows.append(("data folder", "ok" if count else "absent",
                 f"{root} ({count} cases; needed only for training and evaluation)"))
    return rows, problems


def cmd_doctor(args) -> int:
    rows, problems = checks(getattr(args, "data", None))
    width = max(len(topic) for topic, _, _ in rows)
    for topic, status, detail in rows:
        print(f"{topic:<{width}}  {status:<9} {detail}")
    if problems:
        print(f"verdict: NOT READY: {'; '.join(problems)}")
        return 1
    print("verdict: ready (synthesize, sample and demo will run; weights verified)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check versions, device, weights checksums and the data folder")
    p.add_argument("--data", default=None, help="cases folder root (default ../shared/data)")
    p.set_defaults(func=cmd_doctor)
