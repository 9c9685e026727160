"""PathoSyn parameters, stored in the module's vtkMRMLScriptedModuleNode so that saving and reloading a scene
(.mrb / .mrml) restores them.

Inside Slicer the class is built with `slicer.parameterNodeWrapper` (GUI binding via `connectGui`). The
`slicer-core` wheel has no parameterNodeWrapper (it needs Qt), so there the same fields are exposed by a small
Qt-free wrapper that stores them the same way: numbers and strings as node parameters, nodes as node references.
"""
from __future__ import annotations

from typing import Annotated

try:  # Slicer desktop application
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

    HAVE_PARAMETER_NODE_WRAPPER = True
except ImportError:  # slicer-core wheel, plain Python
    HAVE_PARAMETER_NODE_WRAPPER = False

import slicer

from .logic import DEFAULT_POPULATION_PULL  # the card's pull (a test keeps them equal)

MODALITY_FIELDS = {"t1": "t1Volume", "t1c": "t1cVolume", "t2": "t2Volume", "flair": "flairVolume"}
DEVICES = ("auto", "cpu", "cuda")

# name -> (type, default). Node fields default to None. steps = 0 means "the model card's default".
FIELDS = {
    "t1Volume": (slicer.vtkMRMLScalarVolumeNode, None),
    "t1cVolume": (slicer.vtkMRMLScalarVolumeNode, None),
    "t2Volume": (slicer.vtkMRMLScalarVolumeNode, None),
    "flairVolume": (slicer.vtkMRMLScalarVolumeNode, None),
    "maskSegmentation": (slicer.vtkMRMLSegmentationNode, None),
    "maskLabelmap": (slicer.vtkMRMLLabelMapVolumeNode, None),
    "useLabelmap": (bool, False),
    "brainMask": (slicer.vtkMRMLLabelMapVolumeNode, None),
    "seed": (int, 0),
    "samples": (int, 1),
    "steps": (int, 0),
    "preview": (bool, False),
    "guidance": (float, 1.0),
    "populationPull": (float, DEFAULT_POPULATION_PULL),
    "keepBaseTexture": (bool, False),
    "device": (str, "auto"),
}
PREVIEW_STEPS = 2  # the model card's preview setting (engine: DeviationConfig.preview_steps)


def _field(name: str, kind, default):
    def getter(self):
        node = self.parameterNode
        if isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode):
            return node.GetNodeReference(name)
        raw = node.GetParameter(name)
        if raw == "":
            return default
        if kind is bool:
            return raw == "True"
        return kind(raw)

    def setter(self, value):
        node = self.parameterNode
        if isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode):
            if value is not None and not value.IsA(kind.__name__):
                raise TypeError(f"{name}: expected {kind.__name__}, got {value.GetClassName()}")
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        else:
            node.SetParameter(name, str(kind(value)))

    return property(getter, setter)


def qtFreeParameterClass(className: str, fields: dict) -> type:
    """A wrapper class with one property per field {name: (type, default)}, stored like parameterNodeWrapper
    stores them (numbers and strings as node parameters, nodes as node references). Used on slicer-core."""

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode

    namespace = {"__init__": __init__, "__doc__": "Same fields as the parameterNodeWrapper class; `parameterNode` "
                 "is the wrapped vtkMRMLScriptedModuleNode."}
    namespace.update({name: _field(name, kind, default) for name, (kind, default) in fields.items()})
    return type(className, (), namespace)


if HAVE_PARAMETER_NODE_WRAPPER:

    @parameterNodeWrapper
    class PathoSynParameterNode:
        t1Volume: slicer.vtkMRMLScalarVolumeNode
        t1cVolume: slicer.vtkMRMLScalarVolumeNode
        t2Volume: slicer.vtkMRMLScalarVolumeNode
        flairVolume: slicer.vtkMRMLScalarVolumeNode
        maskSegmentation: slicer.vtkMRMLSegmentationNode
        maskLabelmap: slicer.vtkMRMLLabelMapVolumeNode
        useLabelmap: bool = False
        brainMask: slicer.vtkMRMLLabelMapVolumeNode
        seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
        samples: Annotated[int, WithinRange(1, 16)] = 1
        steps: Annotated[int, WithinRange(0, 1000)] = 0
        preview: bool = False
        guidance: Annotated[float, WithinRange(0.0, 10.0)] = 1.0
        populationPull: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULT_POPULATION_PULL
        keepBaseTexture: bool = False
        device: Annotated[str, Choice(list(DEVICES))] = "auto"

else:
    PathoSynParameterNode = qtFreeParameterClass("PathoSynParameterNode", FIELDS)


def inputVolumes(params) -> dict:
    """{modality: node} of the volume fields that are set, in the order t1, t1c, t2, flair."""
    return {mod: getattr(params, attr) for mod, attr in MODALITY_FIELDS.items() if getattr(params, attr) is not None}


def maskNode(params):
    return params.maskLabelmap if params.useLabelmap else params.maskSegmentation


def effectiveSteps(params) -> int | None:
    """None = the model's default number of steps."""
    if params.preview:
        return PREVIEW_STEPS
    return int(params.steps) or None


def boundWidgets(ui) -> dict:
    """{parameter name: widget} of the .ui widgets (slicer.util.childWidgetVariables) that carry a
    `SlicerParameterName` property."""
    out = {}
    for widget in vars(ui).values():
        prop = getattr(widget, "property", None)
        name = prop("SlicerParameterName") if callable(prop) else None
        if name:
            out[str(name)] = widget
    return out


def connectGui(params, ui):
    """Bind the widgets to a parameterNodeWrapper instance and return the tag for `params.disconnectGui(tag)`.
    `connectParametersToGui` returns the tag on every Slicer version (`connectGui` returns None on 5.8)."""
    return params.connectParametersToGui(boundWidgets(ui))
