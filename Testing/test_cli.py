"""`pathosyn` command line: outputs, JSON-lines progress, one-line errors with exit code 2, nothing half-written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, make_ball_mask, make_head

from scripted_models.volume import read_volume, write_volume


def run_cli(*args, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "scripted_models.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture()
def inputs(tmp_path):
    head = make_head()
    img = write_volume(head, tmp_path / "in" / "t1.nii.gz")
    mask = write_volume(make_ball_mask(head), tmp_path / "in" / "mask.nrrd")
    return img, mask


def test_synthesize_writes_outputs_with_jsonl_progress(inputs, tmp_path):
    img, mask = inputs
    out = tmp_path / "out"
    proc = run_cli("synthesize", "--image", f"t1={img}", "--mask", mask, "--out", out, "--samples", "2",
                   "--steps", "2", "--progress", "jsonl")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert events[-1]["event"] == "done"
    for name in ("t1", "residual_t1", "uncertainty_t1", "mask"):
        assert (out / f"{name}.nii.gz").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 2 and report["steps"] == 2
    synthesized = read_volume(out / "t1.nii.gz")
    original = read_volume(img)
    assert synthesized.array.dtype == original.array.dtype
    np.testing.assert_allclose(synthesized.ijk_to_ras(), original.ijk_to_ras(), atol=1e-6)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_warning_is_one_line_and_kept_in_the_report(tmp_path):
    """A lesion too large for the model's grid: the command warns in one line (not Python's file, line and source
    line) and the report keeps the warning."""
    head = make_head(shape=(160, 160, 160), spacing=(1.0, 1.0, 1.0))
    img = write_volume(head, tmp_path / "t1.nii.gz")
    mask = write_volume(make_ball_mask(head, radius_vox=50, labels=False), tmp_path / "mask.nii.gz")
    proc = run_cli("synthesize", "--image", f"t1={img}", "--mask", mask, "--out", tmp_path / "out", "--steps", "1",
                   "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [line for line in lines if line.startswith("pathosyn: warning: ")], proc.stderr
    assert any("exceeds 96^3" in line for line in lines), proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert any("exceeds 96^3" in w for w in report["warnings"])


def _one_line_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pathosyn: error:"), proc.stderr
    return lines[0]


def _write_nifti(array, path, affine=None):
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _bad_input(case, tmp_path, img, mask):
    """(image args, mask path, extra args) for one row of the bad-input battery."""
    head = read_volume(img)
    images, extra = [f"t1={img}"], []

    def mask_of(array, name):
        return write_volume(head.with_array(array), tmp_path / name)

    lesion = read_volume(mask).array
    if case == "empty_mask":
        mask = mask_of(np.zeros(head.shape, np.uint8), "empty.nii.gz")
    elif case == "outside_mask":
        m = np.zeros(head.shape, np.uint8)
        m[:2, :2, :2] = 1
        mask = mask_of(m, "outside.nii.gz")
    elif case == "edge_mask":  # a slab on the volume's border face, in the background
        m = np.zeros(head.shape, np.uint8)
        m[:, :, 0] = 1
        mask = mask_of(m, "edge.nii.gz")
    elif case == "huge_mask":  # the whole head marked as lesion
        mask = mask_of((head.array != 0).astype(np.uint8), "huge.nii.gz")
    elif case == "unknown_labels":
        mask = mask_of(np.where(lesion > 0, 7, 0).astype(np.uint8), "labels7.nii.gz")
    elif case == "negative_labels":
        mask = mask_of(-(lesion.astype(np.int16)), "negative.nii.gz")
    elif case == "float_labels":
        mask = mask_of(np.where(lesion > 0, lesion - 0.5, 0).astype(np.float32), "float.nii.gz")
    elif case == "four_d":
        images = [f"t1={_write_nifti(np.zeros((8, 8, 8, 2), np.float32), tmp_path / '4d.nii.gz')}"]
    elif case == "two_d":
        images = [f"t1={_write_nifti(np.ones((16, 16), np.float32), tmp_path / '2d.nii.gz')}"]
    elif case == "nan_image":
        arr = head.array.astype(np.float32)
        arr[3, 3, 3] = np.nan
        images = [f"t1={_write_nifti(np.transpose(arr, (2, 1, 0)), tmp_path / 'nan.nii.gz')}"]
    elif case == "all_zero_image":
        images = [f"t1={write_volume(head.with_array(np.zeros(head.shape, np.int16)), tmp_path / 'zero.nii.gz')}"]
    elif case == "truncated_image":
        data = img.read_bytes()
        (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
        images = [f"t1={tmp_path / 'cut.nii.gz'}"]
    elif case == "corrupt_image":  # a valid gzip stream of garbage
        import gzip

        (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(bytes(range(256)) * 64))
        images = [f"t1={tmp_path / 'junk.nii.gz'}"]
    elif case == "not_an_image":
        (tmp_path / "notes.txt").write_text("not an image\n")
        images = [f"t1={tmp_path / 'notes.txt'}"]
    elif case == "corrupt_mask":
        data = mask.read_bytes()
        (tmp_path / "cut_mask.nrrd").write_bytes(data[: len(data) // 2])
        mask = tmp_path / "cut_mask.nrrd"
    elif case == "shifted_grid":  # a second modality on a grid shifted by 7 mm
        shifted = type(head)(head.array, head.spacing, tuple(o + 300.0 for o in head.origin), head.direction)
        images = [f"t1={img}", f"flair={write_volume(shifted, tmp_path / 'shifted.nii.gz')}"]
    elif case == "unknown_modality":
        images = [f"pd={img}"]
    elif case == "duplicated_modality":
        images = [f"t1={img}", f"T1={img}"]
    elif case == "missing_file":
        images = [f"t1={tmp_path / 'nope.nii.gz'}"]
    elif case == "negative_seed":
        extra = ["--seed", "-3"]
    elif case == "bad_guidance":
        extra = ["--guidance", "nan"]
    elif case == "zero_samples":
        extra = ["--samples", "0"]
    else:
        raise AssertionError(case)
    return images, mask, extra


BAD_INPUTS = {  # case -> words the one-line error must contain
    "empty_mask": "empty", "outside_mask": "brain", "edge_mask": "brain", "huge_mask": "covers",
    "unknown_labels": "[7]", "negative_labels": "negative", "float_labels": "non-integer",
    "four_d": "3D", "two_d": "3D", "nan_image": "NaN", "all_zero_image": "constant",
    "truncated_image": "cannot read", "corrupt_image": "cannot read", "not_an_image": "cannot read",
    "corrupt_mask": "cannot read", "shifted_grid": "does not cover", "unknown_modality": "unknown modality",
    "duplicated_modality": "twice", "missing_file": "not found", "negative_seed": "seed",
    "bad_guidance": "guidance", "zero_samples": "samples",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_battery(inputs, tmp_path, capfd, case):
    """Every odd input: exit 2, exactly one line on stderr naming the problem, no output folder."""
    from scripted_models.cli import main

    img, mask = inputs
    images, mask, extra = _bad_input(case, tmp_path, img, mask)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    capfd.readouterr()
    code = main(["synthesize", *sum((["--image", i] for i in images), []), "--mask", str(mask), "--out", str(out),
                 "--steps", "1", "--progress", "none", *extra])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (case, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("pathosyn: error:"), (case, err[-2000:])
    assert BAD_INPUTS[case].lower() in lines[0].lower(), (case, lines[0])
    assert not out.exists()
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before  # inputs untouched


def test_output_folder_that_is_a_file_is_refused_before_the_work(inputs, tmp_path, capfd, monkeypatch):
    from scripted_models.cli import main
    from scripted_models.pathosyn import api

    monkeypatch.setattr(api, "synthesize_lesion", lambda *a, **k: pytest.fail("the work ran"))
    monkeypatch.setattr(api, "pseudo_healthy", lambda *a, **k: pytest.fail("the work ran"))
    img, mask = inputs
    taken = tmp_path / "taken.nii.gz"
    taken.write_bytes(b"a user's file")
    for command in ("synthesize", "pseudo-healthy"):
        capfd.readouterr()
        assert main([command, "--image", f"t1={img}", "--mask", str(mask), "--out", str(taken), "--progress",
                     "none"]) == 2
        lines = capfd.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "is not a folder" in lines[0], lines
    assert taken.read_bytes() == b"a user's file"


def test_a_failed_write_is_one_line_not_a_traceback(inputs, tmp_path, capfd, monkeypatch):
    """A full disk or a refused write: one line naming the file, exit code 1."""
    import errno

    from scripted_models import volume
    from scripted_models.cli import EXIT_OS_ERROR, main

    def full_disk(vol, path, compress=True):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(volume, "write_volume", full_disk)
    img, mask = inputs
    capfd.readouterr()
    code = main(["synthesize", "--image", f"t1={img}", "--mask", str(mask), "--out", str(tmp_path / "o"),
                 "--steps", "1", "--progress", "none"])
    lines = capfd.readouterr().err.strip().splitlines()
    assert code == EXIT_OS_ERROR == 1
    assert len(lines) == 1 and "No space left on device" in lines[0] and "t1.nii.gz" in lines[0], lines


def test_a_dicom_series_folder_is_an_image_like_its_nifti(inputs, tmp_path):
    """--image t1=FOLDER (one DICOM series) gives the bytes that the same scan as NIfTI gives."""
    from conftest import write_dicom_series


    img, mask = inputs
    series = write_dicom_series(read_volume(img), tmp_path / "dicom")
    assert_same_synthesis(tmp_path, {"nifti": (img, mask), "dicom": (series, mask)})


def assert_same_synthesis(tmp_path, runs: dict):
    """`synthesize` (1 step) of each run {name: (t1 image, mask)} gives the same output bytes on the same grid."""
    from scripted_models.cli import main

    for name, (image, mask) in runs.items():
        assert main(["synthesize", "--image", f"t1={image}", "--mask", str(mask), "--out", str(tmp_path / name),
                     "--steps", "1", "--progress", "none"]) == 0
    for output in ("t1", "residual_t1", "mask"):
        first, *others = (read_volume(tmp_path / name / f"{output}.nii.gz") for name in runs)
        assert all(np.array_equal(first.array, b.array) and first.same_grid(b) for b in others), output


def test_a_dicom_seg_is_a_mask_like_its_nifti(inputs, tmp_path, capfd):
    """--mask SEG.dcm (a DICOM SEG over the scan's series) gives the bytes that the same mask as NIfTI gives; the
    SEG given as a scan is one line and exit 2."""
    from conftest import write_dicom_seg, write_dicom_series

    from scripted_models.cli import main
    from scripted_models.labels import to_canonical

    img, mask = inputs
    series = write_dicom_series(read_volume(img), tmp_path / "dicom")
    labels = to_canonical(read_volume(mask).array)
    seg = write_dicom_seg(series, {"core": labels == 1, "edema": labels == 2, "enhancing": labels == 3},
                          tmp_path / "lesion_seg.dcm")
    assert_same_synthesis(tmp_path, {"nifti": (series, mask), "seg": (series, seg)})
    beside = series / "lesion_seg.dcm"  # a DICOM export: the SEG in the scan's folder is not a second series
    shutil.copy(seg, beside)
    assert_same_synthesis(tmp_path / "export", {"nifti": (series, mask), "seg": (series, beside)})
    capfd.readouterr()
    assert main(["synthesize", "--image", f"t1={seg}", "--mask", str(mask), "--out", str(tmp_path / "bad"),
                 "--progress", "none"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a DICOM SEG" in err[0] and not (tmp_path / "bad").exists()


def test_zero_steps_is_refused(inputs, tmp_path, capfd):
    from scripted_models.cli import main

    img, mask = inputs
    assert main(["synthesize", "--image", f"t1={img}", "--mask", str(mask), "--out", str(tmp_path / "o"),
                 "--steps", "0"]) == 2
    assert "steps" in capfd.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["missing", "corrupted"])
def test_missing_or_corrupted_weights(inputs, tmp_path, damage):
    from scripted_models.weights import weights_dir

    img, mask = inputs
    wdir = tmp_path / "weights"
    shutil.copytree(weights_dir(), wdir, ignore=shutil.ignore_patterns("pathar*"))
    target = wdir / "deviation_diffusion.safetensors"
    if damage == "missing":
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = run_cli("synthesize", "--image", f"t1={img}", "--mask", mask, "--out", out, "--steps", "1",
                   env_extra={"PATHOSYN_WEIGHTS_DIR": str(wdir)})
    line = _one_line_error(proc)
    assert ("missing" if damage == "missing" else "corrupted") in line
    assert not out.exists() or not any(out.iterdir())


def test_pseudo_healthy_cli(inputs, tmp_path):
    img, mask = inputs
    proc = run_cli("pseudo-healthy", "--image", f"t1={img}", "--mask", mask, "--out", tmp_path / "ph",
                   "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ph" / "t1.nii.gz").is_file()


def test_nrrd_output_format_keeps_geometry(inputs, tmp_path):
    img, mask = inputs
    out = tmp_path / "nrrd"
    proc = run_cli("synthesize", "--image", f"t1={img}", "--mask", mask, "--out", out, "--steps", "1",
                   "--format", "nrrd", "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mask.nrrd", "report.json", "residual_t1.nrrd", "t1.nrrd"]
    synthesized, original = read_volume(out / "t1.nrrd"), read_volume(img)
    assert synthesized.array.dtype == original.array.dtype
    np.testing.assert_allclose(synthesized.ijk_to_ras(), original.ijk_to_ras(), atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["files"]["t1"].endswith("t1.nrrd")


def test_commands_run_under_tcmalloc_when_installed():
    """`pathosyn ...` restarts itself with tcmalloc preloaded (as the engine worker runs) when it is installed;
    PATHOSYN_TCMALLOC=0 keeps the system allocator. The doctor says which one the command runs with."""
    from scripted_models.worker import fast_allocator

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PATHOSYN_TCMALLOC")}
    expected = "tcmalloc" if fast_allocator(env) else "system"
    for extra, allocator in (({}, expected), ({"PATHOSYN_TCMALLOC": "0"}, "system")):
        proc = subprocess.run([sys.executable, "-m", "scripted_models.cli", "doctor"], capture_output=True, text=True,
                              env={**env, "PYTHONPATH": str(ROOT), **extra}, timeout=120, cwd=ROOT)
        assert f"allocator: {allocator}" in proc.stdout, (extra, proc.stdout[-1500:], proc.stderr[-1500:])


def test_version_and_doctor(tmp_path, capsys, monkeypatch):
    from scripted_models import __version__
    from scripted_models.cli import main
    from scripted_models.weights import weights_dir

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "verdict: ready" in out and "weights deviation_diffusion" in out and "torch" in out
    wdir = tmp_path / "weights"  # a damaged copy of the bundle: the verdict names the broken file
    shutil.copytree(weights_dir(), wdir, ignore=shutil.ignore_patterns("ablation"))
    target = wdir / "anatomy_inpainter.safetensors"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    monkeypatch.setenv("PATHOSYN_WEIGHTS_DIR", str(wdir))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "CORRUPTED" in out and "NOT READY" in out and "anatomy_inpainter" in out.splitlines()[-1]
