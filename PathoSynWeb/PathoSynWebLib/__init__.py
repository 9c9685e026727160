"""Browser front end of PathoSyn / PathAR on trame-slicer: state, controller (Qt-free), layouts, panel, app.

The Slicer modules' logic packages live next to this folder (PathoSynSlicer/PathoSynSlicerLib,
PathARModule/PathARModuleLib); they are put on sys.path here, as the PathAR module does for PathoSyn's."""
import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
for _package, _folder in (("PathoSynSlicerLib", "PathoSynSlicer"), ("PathARModuleLib", "PathARModule")):
    if importlib.util.find_spec(_package) is None and (_ROOT / _folder / _package).is_dir():
        sys.path.insert(0, str(_ROOT / _folder))

TEST_HOOKS_ENV = "PATHOSYN_WEB_TEST_HOOKS"  # "1": the server registers the ps_test_* triggers (tests, bench)
