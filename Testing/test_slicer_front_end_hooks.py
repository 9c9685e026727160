"""What the browser front end needs from the Slicer modules' logic, on slicer-core: linking views that the front end
created itself (no vtkMRMLLayoutLogic), and the Volume Rendering logic of an explicit application logic."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import make_ball_mask, make_head

pytest.importorskip("slicer")

from slicer_scene import SlicerScene  # noqa: E402


@pytest.fixture()
def app():
    return SlicerScene()


def add_views(scene, slice_tags, view_tags):
    """Slice / 3D view nodes with these singleton tags, as a front end's own view factory creates them."""
    import slicer

    for tag in slice_tags:
        node = slicer.vtkMRMLSliceNode()
        node.SetSingletonTag(tag)
        node.SetLayoutName(tag)
        scene.AddNode(node)
    for tag in view_tags:
        node = slicer.vtkMRMLViewNode()
        node.SetSingletonTag(tag)
        node.SetLayoutName(tag)
        scene.AddNode(node)


def test_link_compare_views_on_views_the_front_end_created(app):
    from PathoSynSlicerLib.logic import (
        COMPARE_3D_TAG,
        COMPARE_SLICE_TAGS,
        COMPARE_VIEW_GROUP,
        InputError,
        PathoSynSlicerLogic,
        linkCompareViews,
    )

    logic = PathoSynSlicerLogic(app.scene)
    head = make_head()
    a = logic.addVolumeNode(head, "in")
    b = logic.addVolumeNode(head, "out")
    with pytest.raises(InputError, match="did not create its views"):
        linkCompareViews(app.scene, a, b)
    add_views(app.scene, COMPARE_SLICE_TAGS, [COMPARE_3D_TAG])
    views = linkCompareViews(app.scene, a, b)
    assert [c.GetBackgroundVolumeID() for c in views.compositeNodes] == [a.GetID(), b.GetID()]
    assert all(c.GetLinkedControl() for c in views.compositeNodes)
    assert {n.GetViewGroup() for n in (*views.sliceNodes, views.viewNode)} == {COMPARE_VIEW_GROUP}


def test_pathar_link_views_and_explicit_application_logic(app):
    import slicer
    from PathARModuleLib.logic import (
        PATHAR_VIEW_GROUP,
        PATHOSYN_3D_TAG,
        PATHOSYN_SLICE_TAGS,
        PathARModuleLogic,
        sliceTag,
        viewTag,
    )

    other = slicer.vtkSlicerApplicationLogic()  # e.g. trame-slicer's SlicerApp.app_logic, with its own VR logic
    other.SetMRMLScene(app.scene)
    theirs = slicer.vtkSlicerVolumeRenderingLogic()
    theirs.SetMRMLApplicationLogic(other)
    theirs.SetMRMLScene(app.scene)
    other.SetModuleLogic("VolumeRendering", theirs)
    logic = PathARModuleLogic(app.scene, appLogic=other)
    assert logic._volumeRenderingLogic() is theirs
    assert PathARModuleLogic(app.scene)._volumeRenderingLogic() is not theirs  # default: slicer.app_logic's

    n = 2
    add_views(app.scene, [*PATHOSYN_SLICE_TAGS, *[sliceTag(i) for i in range(n)]],
              [PATHOSYN_3D_TAG, *[viewTag(i) for i in range(n)]])
    patch = make_head(shape=(24, 24, 24), spacing=(1.0, 1.0, 1.0))
    mask = make_ball_mask(patch, radius_vox=5)
    run = logic.addSampleNodes([(mask, {"t1c": patch, "flair": patch.with_array(-patch.array)})] * n,
                               ["t1c", "flair"], seed=0, temperature=1.0)
    layout = logic.linkViews(n, volumeRendering=True)
    assert {v.GetViewGroup() for v in (*layout.sliceNodes, *layout.viewNodes)} == {PATHAR_VIEW_GROUP}
    logic.showModality(run, layout, "flair")
    assert [c.GetBackgroundVolumeID() for c in layout.sliceCompositeNodes] == \
        [s.volumes["flair"].GetID() for s in run.samples]
    display = theirs.GetFirstVolumeRenderingDisplayNode(run.samples[0].volumes["flair"])
    assert display is not None and display.GetVisibility()
    structure = [np.asarray(logic.labelsFromSegmentation(s.segmentation).array) for s in run.samples]
    logic.showModality(run, layout, "t1c")  # switching the modality keeps the structures
    assert all(np.array_equal(logic.labelsFromSegmentation(s.segmentation).array, m)
               for s, m in zip(run.samples, structure))


def test_removing_results_leaves_no_display_nodes_behind(app):
    """A front end that replaces its result must get the scene (and the memory) back: display, storage nodes and
    subject-hierarchy items go with the data nodes."""
    import slicer
    from PathARModuleLib.logic import PathARModuleLogic
    from PathoSynSlicerLib.logic import PathoSynSlicerLogic, SynthesisNodes

    logic = PathoSynSlicerLogic(app.scene)
    head = make_head()
    source = logic.addVolumeNode(head, "source")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    count, items = app.scene.GetNumberOfNodes(), sh.GetNumberOfItems()
    out = SynthesisNodes(volumes={"t1": logic.addVolumeNode(head, "out")},
                         residuals={"t1": logic.addVolumeNode(head, "residual")})
    out.segmentation = logic.addSegmentationNode(make_ball_mask(head).array, head.ijk_to_ras(), "lesion", False, source)
    logic.placeNextToInput(out.nodes(), source)
    logic.tagOutput(out.volumes["t1"], "synthesized", logic.nextRunNumber(), source, "t1")  # scene queries
    assert logic.latestSynthesis()[1] is out.volumes["t1"]
    volume = out.volumes["t1"]
    out.removeFromScene()
    assert app.scene.GetNumberOfNodes() == count and sh.GetNumberOfItems() == items  # no display node left behind
    # nothing but this Python name holds the removed node (a collection from GetNodesByClass would: its voxels leak)
    assert volume.GetReferenceCount() == 1

    pathar = PathARModuleLogic(app.scene)
    patch = make_head(shape=(24, 24, 24), spacing=(1.0, 1.0, 1.0))
    run = pathar.addSampleNodes([(make_ball_mask(patch, radius_vox=5), {"t1c": patch})], ["t1c"], 0, 1.0)
    run.removeFromScene()
    assert app.scene.GetNumberOfNodes() == count and sh.GetNumberOfItems() == items
