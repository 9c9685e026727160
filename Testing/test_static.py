"""Static checks of the Slicer modules: .ui files, widget names used by the code, CMake lists, ruff, Qt-free logic."""
from __future__ import annotations

import py_compile
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import ROOT

MODULES = ["PathoSynSlicer", "PathARModule"]


def module_dirs():
    out = []
    for name in MODULES:
        folder = ROOT / name
        if not (folder / f"{name}.py").is_file():
            continue  # a module another engineer has not created yet
        out.append(pytest.param(folder, id=name))
    return out


def ui_names(ui_path: Path) -> set[str]:
    root = ET.parse(ui_path).getroot()
    return {w.get("name") for w in root.iter() if w.tag in ("widget", "layout", "spacer") and w.get("name")}


def used_ui_names(folder: Path) -> dict[str, set[str]]:
    """{file: names} for every `ui.<name>` / `self.ui.<name>` attribute access in the module's Python files."""
    out = {}
    for path in folder.rglob("*.py"):
        names = set(re.findall(r"\bui\.([A-Za-z_]\w*)", path.read_text()))
        names -= {"setupUi"}
        if names:
            out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("folder", module_dirs())
def test_ui_parses_and_every_widget_the_code_uses_exists(folder):
    uis = sorted((folder / "Resources" / "UI").glob("*.ui"))
    assert uis, f"no .ui file in {folder}"
    declared = set()
    for ui in uis:
        declared |= ui_names(ui)
    used = used_ui_names(folder)
    assert used, "the module code does not use its .ui?"
    missing = {f: sorted(n - declared) for f, n in used.items() if n - declared}
    assert not missing, f"widget names used in code but absent from the .ui: {missing}"
    # SlicerParameterName properties must name parameter fields (parameterNodeWrapper binds them by name)
    root = ET.parse(uis[0]).getroot()
    bound = {p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound
    sys.path.insert(0, str(folder))
    if folder.name == "PathoSynSlicer":
        from PathoSynSlicerLib.parameters import FIELDS
    else:
        from PathARModuleLib.parameters import FIELDS
    assert bound <= set(FIELDS), bound - set(FIELDS)


@pytest.mark.parametrize("folder", module_dirs())
def test_cmake_lists_every_script_and_resource(folder):
    cmake = (folder / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in cmake and "WITH_GENERIC_TESTS" in cmake
    name = folder.name
    listed = set(re.findall(r"\$\{MODULE_NAME\}(\S*)", cmake)) | set(re.findall(r"(Resources/\S+)", cmake))
    listed = {p.replace("${MODULE_NAME}", name) for p in listed}
    listed = {(name + p) if p.startswith(("Lib/", ".py")) else p for p in listed}
    files = {str(p.relative_to(folder)) for p in folder.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and "Testing" not in p.parts
             and p.suffix in (".py", ".ui", ".png")}
    assert not files - listed, f"not listed in {folder.name}/CMakeLists.txt: {sorted(files - listed)}"


def test_extension_cmake_metadata():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf"set\({key} \S", cmake), key
    assert "set(EXTENSION_DEPENDS PyTorch)" in cmake
    for line in ("add_subdirectory(PathoSynSlicer)", "add_subdirectory(PathARModule)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in cmake
    screenshots = re.search(r"EXTENSION_SCREENSHOTURLS \"([^\"]*)\"", cmake).group(1).split()
    assert len(screenshots) == 2
    for url in screenshots:
        assert (ROOT / url.split("/main/", 1)[1]).is_file(), url
    icon = re.search(r"EXTENSION_ICONURL \"[^\"]*/main/(\S+?)\"", cmake).group(1)
    assert (ROOT / icon).is_file()


def test_icons_are_128px_png():
    from PIL import Image

    icons = (ROOT / "PathoSynSlicer/Resources/Icons/PathoSynSlicer.png", ROOT / "Resources/PathoSyn.png",
             ROOT / "PathARModule/Resources/Icons/PathARModule.png")
    for path in icons:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == (128, 128)


@pytest.mark.parametrize("folder", module_dirs())
def test_module_files_compile(folder):
    for path in folder.rglob("*.py"):
        py_compile.compile(str(path), doraise=True)


def test_ruff_clean():
    """The whole repository: both modules, the engine and the tests (pyproject.toml holds the rules)."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    proc = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_logic_imports_without_qt():
    """The logic, parameters, process and offscreen files must import on slicer-core (no Qt, no Slicer app)."""
    pytest.importorskip("slicer")
    code = ("import sys; sys.path[:0] = ['PathoSynSlicer', 'PathARModule'];"
            "import PathoSynSlicerLib.logic, PathoSynSlicerLib.parameters, PathoSynSlicerLib.process;"
            "import PathARModuleLib.logic, PathARModuleLib.parameters, PathARModuleLib.offscreen;"
            "bad = [m for m in ('qt', 'ctk', 'slicer.ScriptedLoadableModule', 'torch') if m in sys.modules];"
            "assert not bad, bad; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_engine_importable_from_a_clone_via_module_path(tmp_path):
    """'Add module path' on a clone: logic.py finds scripted_models in the repository root by itself."""
    code = (f"import sys; sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r})];"
            f"sys.path.insert(0, {str(ROOT / 'PathoSynSlicer')!r}); import PathoSynSlicerLib.logic as L;"
            "print(L.ENGINE_ROOT)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip().splitlines()[-1]) == ROOT


def test_pathar_logic_importable_with_only_its_module_path(tmp_path):
    """'Add module path' on PathARModule alone: it finds PathoSynSlicerLib and the engine in the clone."""
    pytest.importorskip("slicer")
    code = (f"import sys; sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r})];"
            f"sys.path.insert(0, {str(ROOT / 'PathARModule')!r}); import PathARModuleLib.logic as L;"
            "import scripted_models, PathoSynSlicerLib; print(scripted_models.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip().splitlines()[-1]).parent.parent == ROOT


# --- review of the Slicer modules: Python 3.9 (Slicer 5.8), packaging, licence ----------------------------------------
PY39_SOURCES = ("PathoSynSlicer", "PathARModule", "scripted_models", "Testing")


def test_python39_is_the_declared_minimum():
    """Slicer 5.8 ships Python 3.9.10: pyproject and ruff say so, and every file parses with the 3.9 grammar
    (no `match`, no parenthesised context managers, ...)."""
    import ast

    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^requires-python = ">=3\.9"', text, re.M)
    assert re.search(r'^target-version = "py39"', text, re.M)
    bad = []
    for folder in PY39_SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            source = path.read_text()
            try:
                ast.parse(source, filename=str(path), feature_version=(3, 9))
            except SyntaxError as exc:
                bad.append(f"{path.relative_to(ROOT)}:{exc.lineno}: {exc.msg}")
    assert not bad, bad


@pytest.mark.parametrize("folder", module_dirs())
def test_module_files_postpone_annotations(folder):
    """`X | None` annotations need `from __future__ import annotations` on Python 3.9."""
    for path in folder.rglob("*.py"):
        source = path.read_text()
        if re.search(r"(->|:)\s*[\w.\[\], ]+\|\s*\w", source) and path.name != "__init__.py":
            assert "from __future__ import annotations" in source, path


def test_cmake_does_not_package_ablation_weights():
    cmake = (ROOT / "PathoSynSlicer" / "CMakeLists.txt").read_text()
    assert 'EXCLUDE REGEX "^weights/ablation/"' in cmake
    assert (ROOT / "CMakeLists.txt").read_text().startswith("cmake_minimum_required(VERSION 3.20.6...3.22.6")


def test_license_files_and_description_name_the_licences():
    for name in ("LICENSE.txt", "LICENSE"):
        text = (ROOT / name).read_text()
        assert "Apache License" in text and "Version 2.0, January 2004" in text
        assert "END OF TERMS AND CONDITIONS" in text
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]*)"', (ROOT / "CMakeLists.txt").read_text()).group(1)
    assert "Apache-2.0" in description and "non-commercial research use only" in description
