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


def _one_line_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pathosyn: error:"), proc.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["empty_mask", "outside_mask", "four_d", "nan", "mismatched", "unknown_modality",
                                  "bad_pair", "missing_file"])
def test_bad_input_exit_2_and_nothing_written(inputs, tmp_path, case):
    import nibabel as nib

    img, mask = inputs
    head = read_volume(img)
    out = tmp_path / "out"
    images = [f"t1={img}"]
    if case == "empty_mask":
        mask = write_volume(head.with_array(np.zeros(head.shape, np.uint8)), tmp_path / "empty.nii.gz")
    elif case == "outside_mask":
        m = np.zeros(head.shape, np.uint8)
        m[:2, :2, :2] = 1
        mask = write_volume(head.with_array(m), tmp_path / "outside.nii.gz")
    elif case == "four_d":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), str(tmp_path / "4d.nii.gz"))
        images = [f"t1={tmp_path / '4d.nii.gz'}"]
    elif case == "nan":
        arr = head.array.astype(np.float32)
        arr[3, 3, 3] = np.inf
        nib.save(nib.Nifti1Image(np.transpose(arr, (2, 1, 0)), np.eye(4)), str(tmp_path / "nan.nii.gz"))
        images = [f"t1={tmp_path / 'nan.nii.gz'}"]
    elif case == "mismatched":
        other = write_volume(make_head(shape=(30, 30, 30)), tmp_path / "other.nii.gz")
        images = [f"t1={img}", f"flair={other}"]
    elif case == "unknown_modality":
        images = [f"pd={img}"]
    elif case == "bad_pair":
        images = [str(img)]
    elif case == "missing_file":
        images = [f"t1={tmp_path / 'nope.nii.gz'}"]
    proc = run_cli("synthesize", *sum((["--image", i] for i in images), []), "--mask", mask, "--out", out,
                   "--steps", "1")
    _one_line_error(proc)
    assert not out.exists() or not any(out.iterdir())


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
