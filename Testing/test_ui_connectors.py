"""Static check (no Qt, no Slicer): every widget that a .ui binds with `SlicerParameterName` has a parameterNodeWrapper
GUI connector for the declared type of that parameter.

`connectGui` builds every connector up front and raises `RuntimeError("Unable to create GUI connector ...")` for the
first (type, widget class) pair without one, which leaves the whole module panel unconnected (review finding A1:
a `qSlicerSimpleMarkupsWidget` bound to a markups node). The parameter types are read from the module's
parameters.py with `ast` (the file is not imported: it needs Qt inside Slicer).

CONNECTORS is transcribed from Slicer's `Base/Python/slicer/parameterNodeWrapper/guiConnectors.py` (v5.8.0 / v5.10.0).
Each connector's `canRepresent` compares the EXACT widget class (`type(widget) in (...)`, subclasses do not count)
and the unannotated Python type. Connectors that other modules register at runtime are not listed, so a widget
that needs one fails here: add it to the table only after checking that the module registering it is a dependency.
"""
from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import pytest
from conftest import ROOT

PATH_TYPES = frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"})

# (connector class in guiConnectors.py, exact widget classes, accepted unannotated types, extra requirement)
#   types: Python type names; "node" = an MRML node class or a Union of them; "enum" = an enum.Enum subclass
#   requirement: "choice" = a Choice(...) annotation is required (else RuntimeError);
#                "bounded" = WithinRange or Minimum+Maximum required for the listed slider classes (else RuntimeError)
CONNECTORS = (
    ("QCheckBoxToBoolConnector", {"QCheckBox", "ctkCheckBox"}, {"bool"}, None),
    ("QCheckablePushButtonToBoolConnector", {"QPushButton"}, {"bool"}, None),
    ("ctkCheckablePushButtonToBoolConnector", {"ctkCheckablePushButton"}, {"bool"}, None),
    ("QSliderOrSpinBoxToIntConnector", {"QSlider", "QSpinBox"}, {"int"}, ("bounded", {"QSlider"})),
    ("QDoubleSpinBoxCtkSliderWidgetToFloatConnector",
     {"QDoubleSpinBox", "ctkDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget"}, {"float"},
     ("bounded", {"ctkSliderWidget", "qMRMLSliderWidget"})),
    ("QComboBoxToStringableConnector", {"QComboBox", "ctkComboBox"}, {"int", "float", "str", "bool"},
     ("choice", None)),
    ("QComboBoxToEnumConnector", {"QComboBox", "ctkComboBox"}, {"enum"}, None),
    ("QLineEditToStrConnector", {"QLineEdit"}, {"str"}, None),
    ("QLabelToStrConnector", {"QLabel"}, {"str"}, None),
    ("QTextEditPlainTextToStrConnector", {"QTextEdit"}, {"str"}, None),
    ("ctkRangeWidgetToRangeConnector", {"ctkRangeWidget"}, {"FloatRange"}, None),
    ("ctkPathLineEditToPathConnector", {"ctkPathLineEdit"}, set(PATH_TYPES), None),
    ("ctkDirectoryButtonToPathConnector", {"ctkDirectoryButton"}, set(PATH_TYPES), None),
    ("qMRMLNodeComboBoxToNodeConnector", {"qMRMLNodeComboBox"}, {"node"}, None),
    ("ctkColorPickerButtonToQColorConnector", {"ctkColorPickerButton"}, {"QColor"}, None),
)

MODULES = {"PathoSynSlicer": "PathoSynSlicerLib/parameters.py", "PathARModule": "PathARModuleLib/parameters.py"}


@dataclass
class ParamType:
    base: str  # bool, int, float, str, node, Path, ... (the unannotated type)
    annotations: set = field(default_factory=set)  # names of the Annotated[...] extras: WithinRange, Choice, ...

    @property
    def bounded(self) -> bool:
        return "WithinRange" in self.annotations or {"Minimum", "Maximum"} <= self.annotations


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a string annotation
        return node.value
    raise ValueError(f"unsupported annotation {ast.dump(node)}")


def _baseType(node: ast.AST) -> str:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # A | B
        parts = {_baseType(node.left), _baseType(node.right)}
        return "node" if parts == {"node"} else "union"
    if isinstance(node, ast.Subscript):
        name = _dotted(node.value).split(".")[-1]
        if name in ("Union", "Optional"):
            elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            parts = {_baseType(e) for e in elts}
            return "node" if parts == {"node"} else "union"
        return name
    name = _dotted(node).split(".")[-1]
    return "node" if name.startswith("vtkMRML") else name


def parseParameterTypes(source: str) -> dict[str, ParamType]:
    """{field: ParamType} of every `@parameterNodeWrapper` class in `source` (the class body's annotations)."""
    out = {}
    for cls in ast.walk(ast.parse(source)):
        if not isinstance(cls, ast.ClassDef):
            continue
        if not any(_dotted(d.func if isinstance(d, ast.Call) else d).endswith("parameterNodeWrapper")
                   for d in cls.decorator_list):
            continue
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            ann = stmt.annotation
            if isinstance(ann, ast.Subscript) and _dotted(ann.value).split(".")[-1] == "Annotated":
                first, *extras = ann.slice.elts
                names = {_dotted(e.func if isinstance(e, ast.Call) else e).split(".")[-1] for e in extras}
                out[stmt.target.id] = ParamType(_baseType(first), names)
            else:
                out[stmt.target.id] = ParamType(_baseType(ann))
    return out


def boundWidgets(uiText: str) -> list[tuple[str, str, str]]:
    """[(widget name, widget class, parameter name)] of every widget with a SlicerParameterName property."""
    root = ET.fromstring(uiText)
    out = []
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out.append((widget.get("name"), widget.get("class"), prop.find("string").text))
    return out


def connectorFor(widgetClass: str, param: ParamType):
    """(connector name, None) when Slicer has a connector, else (None, reason)."""
    candidates = [c for c in CONNECTORS if widgetClass in c[1] and param.base in c[2]]
    if not candidates:
        return None, (f"no GUI connector for ({param.base}, {widgetClass}): connectGui raises 'Unable to create GUI "
                      "connector'")
    name, _, _, requirement = candidates[0]  # the first registered connector that canRepresent() wins
    if requirement is not None:
        kind, classes = requirement
        if kind == "choice" and "Choice" not in param.annotations:
            return None, f"{name} needs a Choice(...) annotation"
        if kind == "bounded" and widgetClass in classes and not param.bounded:
            return None, f"{name} needs WithinRange (or Minimum and Maximum) for a {widgetClass}"
    return name, None


def connectorProblems(uiText: str, parametersSource: str) -> list[str]:
    types = parseParameterTypes(parametersSource)
    problems = []
    for widget, widgetClass, param in boundWidgets(uiText):
        if param not in types:
            problems.append(f"{widget} ({widgetClass}): '{param}' is not a parameterNodeWrapper field")
            continue
        _, reason = connectorFor(widgetClass, types[param])
        if reason:
            problems.append(f"{widget} ({widgetClass}) -> {param}: {reason}")
    return problems


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_bound_widget_has_a_gui_connector(module):
    folder = ROOT / module
    ui = (folder / "Resources" / "UI" / f"{module}.ui").read_text()
    params = (folder / MODULES[module]).read_text()
    assert boundWidgets(ui), "the .ui binds no widget?"
    assert parseParameterTypes(params), "no @parameterNodeWrapper class found"
    problems = connectorProblems(ui, params)
    assert not problems, "\n".join(problems)


def test_checker_reports_a_markups_widget_bound_to_a_node():
    """The check itself can fail: the pre-fix PathAR binding (review A1) and other known-bad pairs are reported."""
    params = (ROOT / "PathARModule" / MODULES["PathARModule"]).read_text()
    ui = """<ui version="4.0"><widget class="qMRMLWidget" name="W">
      <widget class="qSlicerSimpleMarkupsWidget" name="placementPointWidget">
        <property name="SlicerParameterName" stdset="0"><string>placementPoint</string></property></widget>
      <widget class="QComboBox" name="seedCombo">
        <property name="SlicerParameterName" stdset="0"><string>renderT1</string></property></widget>
      <widget class="ctkSliderWidget" name="s">
        <property name="SlicerParameterName" stdset="0"><string>seed</string></property></widget>
      <widget class="QSpinBox" name="unknown">
        <property name="SlicerParameterName" stdset="0"><string>noSuchField</string></property></widget>
    </widget></ui>"""
    problems = connectorProblems(ui, params)
    assert len(problems) == 4, problems
    assert "qSlicerSimpleMarkupsWidget" in problems[0] and "Unable to create GUI connector" in problems[0]
    assert "Choice" in problems[1]  # bool in a QComboBox needs Choice
    assert "no GUI connector for (int, ctkSliderWidget)" in problems[2]
    assert "not a parameterNodeWrapper field" in problems[3]


def test_parameter_types_are_parsed_from_the_source():
    types = parseParameterTypes((ROOT / "PathoSynSlicer" / MODULES["PathoSynSlicer"]).read_text())
    assert types["t1Volume"].base == "node" and types["useLabelmap"].base == "bool"
    assert types["guidance"].base == "float" and types["guidance"].bounded
    assert types["device"].base == "str" and "Choice" in types["device"].annotations
