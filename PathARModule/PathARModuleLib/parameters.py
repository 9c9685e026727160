"""PathAR parameters in the module's vtkMRMLScriptedModuleNode (saved and restored with the scene).

Inside Slicer: `slicer.parameterNodeWrapper` (GUI binding by `SlicerParameterName` in the .ui; the placement
markups widget has no GUI connector and is bound by hand in widget.py). On the
`slicer-core` wheel: the same fields through PathoSyn's Qt-free wrapper, stored the same way.
"""
from __future__ import annotations

from typing import Annotated

import slicer
from PathoSynSlicerLib.parameters import DEVICES, HAVE_PARAMETER_NODE_WRAPPER, qtFreeParameterClass

from scripted_models.labels import MODALITIES
from scripted_models.pathar import ANATOMY_CHOICES as PATHAR_ANATOMY_CHOICES

# name -> (type, default). Node fields default to None.
FIELDS = {
    "renderT1": (bool, False),
    "renderT1c": (bool, True),
    "renderT2": (bool, False),
    "renderFlair": (bool, True),
    "numberOfSamples": (int, 4),
    "seed": (int, 0),
    "temperature": (float, 1.0),
    "displayedModality": (str, "flair"),
    "chosenSample": (int, 1),
    "targetVolume": (slicer.vtkMRMLScalarVolumeNode, None),
    "targetModality": (str, "t1"),
    "placementPoint": (slicer.vtkMRMLMarkupsFiducialNode, None),
    "addToCurrentMask": (bool, False),
    "device": (str, "auto"),
    "anatomyFrom": (str, "card"),
}
ANATOMY_CHOICES = PATHAR_ANATOMY_CHOICES  # the weights' default, each modality its own anatomy, or one shared
RENDER_FIELDS = {"t1": "renderT1", "t1c": "renderT1c", "t2": "renderT2", "flair": "renderFlair"}

if HAVE_PARAMETER_NODE_WRAPPER:
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

    @parameterNodeWrapper
    class PathARParameterNode:
        renderT1: bool = False
        renderT1c: bool = True
        renderT2: bool = False
        renderFlair: bool = True
        numberOfSamples: Annotated[int, WithinRange(1, 4)] = 4
        seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
        temperature: Annotated[float, WithinRange(0.1, 3.0)] = 1.0
        displayedModality: Annotated[str, Choice(list(MODALITIES))] = "flair"
        chosenSample: Annotated[int, WithinRange(1, 4)] = 1
        targetVolume: slicer.vtkMRMLScalarVolumeNode
        targetModality: Annotated[str, Choice(list(MODALITIES))] = "t1"
        placementPoint: slicer.vtkMRMLMarkupsFiducialNode
        addToCurrentMask: bool = False
        device: Annotated[str, Choice(list(DEVICES))] = "auto"
        anatomyFrom: Annotated[str, Choice(list(ANATOMY_CHOICES))] = "card"

else:
    PathARParameterNode = qtFreeParameterClass("PathARParameterNode", FIELDS)


def renderModalities(params) -> list[str]:
    """The modalities ticked for rendering, in the order t1, t1c, t2, flair."""
    return [mod for mod, attr in RENDER_FIELDS.items() if getattr(params, attr)]


def placementPointRAS(params):
    """RAS of the first control point of the placement markups, or None."""
    node = params.placementPoint
    if node is None or node.GetNumberOfControlPoints() < 1:
        return None
    point = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(0, point)
    return point
