"""Case-level folds: subjects never straddle folds, the test fold is fixed and free of tuned-on subjects."""
from __future__ import annotations

import json


def test_folds_are_fixed_disjoint_by_subject_and_exclude_other_lesions(data_root):
    from scripted_models.folds import LOW_GRADE, NOT_IN_FOLDS, make_folds, subject_of

    folds = make_folds(str(data_root))
    assert make_folds.__wrapped__(str(data_root)) == folds  # deterministic, not an accident of the cache
    roles = [set(folds.test), set(folds.validation), set(folds.train)]
    assert all(not (a & b) for i, a in enumerate(roles) for b in roles[i + 1:])
    subjects = [{subject_of(c) for c in r} for r in roles]
    assert all(not (a & b) for i, a in enumerate(subjects) for b in subjects[i + 1:])  # twins share a fold
    assert len(folds.test) == 5 and len(folds.validation) == 4
    held = folds.test + folds.validation
    # earlier models were trained and tuned on BraTS 2013 subjects: none may sit in a held-out fold
    assert not [c for c in held if "2013" in c]
    assert {"brats2013_pat0003", "brats18_2013_3_1", "brats_pkg_case"} <= set(folds.train)
    assert set(folds.test) & LOW_GRADE and set(folds.validation) & LOW_GRADE  # both grades are judged
    for case_id in held:
        info = json.loads((data_root / "cases" / case_id / "case.json").read_text())
        assert info["labels"] == "manual" and len(info["modalities"]) == 4
    assert not (NOT_IN_FOLDS & set(folds.train + held))
    assert not [c for c in folds.train + held if c.startswith("openms")]  # MS lesions: no lesion-type condition


def test_commands_that_need_the_folds_refuse_a_missing_data_folder_in_one_line(tmp_path, capsys):
    import pytest

    from scripted_models.cli import main
    from scripted_models.errors import InputError
    from scripted_models.folds import make_folds

    with pytest.raises(InputError, match="no labelled cases"):
        make_folds(str(tmp_path))
    for argv in (["calibrate", "anatomy", "--data", str(tmp_path)], ["calibrate", "deviation", "--data", str(tmp_path)],
                 ["train", "anatomy", "--steps", "1", "--data", str(tmp_path), "--work", str(tmp_path / "work")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pathosyn: error: no labelled cases") and "\n" not in err
