"""PathAR Slicer module on a real (headless) MRML scene from the slicer-core wheel. The engine is not stubbed."""
from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import ROOT, make_head

pytest.importorskip("slicer")

from slicer_scene import SlicerScene, array_of, ijk_to_ras, matrix_from_vtk  # noqa: E402

MODS = ["t1c", "flair"]
N = 2
SEED = 3
SCREENSHOT = ROOT / "Resources" / "Screenshots" / "pathar.png"


@pytest.fixture(scope="module")
def app():
    return SlicerScene()


@pytest.fixture(scope="module")
def logic(app):
    from PathARModuleLib.logic import PathARModuleLogic

    return PathARModuleLogic(app.scene)


@pytest.fixture(scope="module")
def run(logic):
    return logic.generateSamples(MODS, n=N, seed=SEED, temperature=1.0)


@pytest.fixture(scope="module")
def layout(logic, run):
    return logic.createLinkedLayout(run)


def segment_labels(logic, segmentation):
    return logic.labelsFromSegmentation(segmentation)


def add_target(app, direction=None, spacing=(1.0, 1.0, 1.0), shape=(90, 100, 110), name="healthy"):
    head = make_head(shape=shape, spacing=spacing, direction=direction)
    return head, app.add_volume(head.array, head.ijk_to_ras(), name)


def centroid_ras(volume_node, labels: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(labels > 0)[:, ::-1].mean(axis=0)
    return (ijk_to_ras(volume_node) @ np.r_[ijk, 1.0])[:3]


# --- samples -> nodes ------------------------------------------------------------------------------------------------
def test_samples_become_nodes_with_patch_geometry_and_named_segments(app, logic, run):
    from scripted_models.labels import SUBREGION_COLORS, SUBREGION_NAMES
    from scripted_models.pathar.api import sample_pairs

    pairs = sample_pairs(MODS, n=N, seed=SEED)
    assert len(run.samples) == N
    for sample, pair in zip(run.samples, pairs):
        assert list(sample.volumes) == MODS
        for mod, node in sample.volumes.items():
            assert node.GetScene() is app.scene and node.IsA("vtkMRMLScalarVolumeNode")
            assert np.allclose(node.GetSpacing(), pair.mask.spacing)
            assert np.allclose(ijk_to_ras(node), pair.mask.ijk_to_ras())  # origin 0, 2 mm, axis-aligned
            assert np.array_equal(array_of(node), pair.images[mod].array)  # exactly the engine's sample
        seg = sample.segmentation.GetSegmentation()
        segments = [seg.GetNthSegment(i) for i in range(seg.GetNumberOfSegments())]
        names = {segment.GetName(): segment.GetColor() for segment in segments}
        present = {v for v in (1, 2, 3) if (pair.mask.array == v).any()}
        assert set(names) == {SUBREGION_NAMES[v] for v in present}
        for v in present:
            assert np.allclose(names[SUBREGION_NAMES[v]], SUBREGION_COLORS[v], atol=1e-6)
        labels = segment_labels(logic, sample.segmentation)
        assert (labels.array > 0).sum() == (pair.mask.array > 0).sum()
        for v in present:
            assert (labels.array == v).sum() == (pair.mask.array == v).sum()


def test_run_is_grouped_in_one_subject_hierarchy_folder(app, run):
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    assert run.folderItemID and sh.GetItemParent(run.folderItemID) == sh.GetSceneItemID()
    for sample in run.samples:
        assert sh.GetItemParent(sample.folderItemID) == run.folderItemID
        for node in sample.nodes():
            assert sh.GetItemParent(sh.GetItemByDataNode(node)) == sample.folderItemID


def test_background_job_matches_blocking_run_and_cancel_leaves_scene(app, logic, run):
    from PathoSynSlicerLib.process import CANCELLED, DONE, CLIRunner, engineRoot

    job = logic.createJob(MODS, n=N, seed=SEED, temperature=1.0, threads=1)
    fractions = []
    runner = CLIRunner(job.argv, engineRoot=engineRoot(), onProgress=lambda f, m: fractions.append(f))
    try:
        assert runner.start().wait(timeout=600) == DONE, runner.error
        assert fractions and fractions == sorted(fractions)
        other = logic.loadJobOutputs(job)
    finally:
        job.cleanup()
    for a, b in zip(run.samples, other.samples):  # same tokens; decoder sums differ by thread count only
        assert np.array_equal(segment_labels(logic, a.segmentation).array, segment_labels(logic, b.segmentation).array)
        for mod in MODS:
            assert np.allclose(array_of(a.volumes[mod]), array_of(b.volumes[mod]), atol=1e-4)
    other.removeFromScene()

    before = app.node_ids()
    job = logic.createJob(MODS, n=N, seed=SEED)
    runner = CLIRunner(job.argv, engineRoot=engineRoot()).start()
    runner.cancel()
    job.cleanup()
    assert runner.state == CANCELLED and app.node_ids() == before and not job.folder.exists()


def test_anatomy_choice_reaches_the_engine(logic):
    """The Anatomy choice goes to `pathosyn sample --anatomy-from`; a bad one is a one-line error and no job."""
    from scripted_models.errors import InputError

    job = logic.createJob(MODS, n=1, seed=SEED, anatomyFrom="t2")
    try:
        assert job.argv[job.argv.index("--anatomy-from") + 1] == "t2"
    finally:
        job.cleanup()
    job = logic.createJob(MODS, n=1, seed=SEED)
    job.cleanup()
    assert job.argv[job.argv.index("--anatomy-from") + 1] == "card"
    with pytest.raises(InputError, match="anatomy must be one of card, none, t1"):
        logic.createJob(MODS, n=1, seed=SEED, anatomyFrom="pd")
    with pytest.raises(InputError, match="anatomy must be one of"):
        logic.generateSamples(MODS, n=1, seed=SEED, anatomyFrom="")


def test_generate_through_the_warm_worker_matches_the_blocking_run(app, logic, run):
    from PathoSynSlicerLib.process import DONE, WorkerRunner

    from scripted_models.worker import EngineWorker

    job = logic.createJob(MODS, n=N, seed=SEED, temperature=1.0)
    with EngineWorker(threads=1) as worker:
        try:
            assert WorkerRunner(job.argv, worker=worker).start().wait(timeout=600) == DONE
            other = logic.loadJobOutputs(job)
        finally:
            job.cleanup()
    for a, b in zip(run.samples, other.samples):
        assert np.array_equal(segment_labels(logic, a.segmentation).array, segment_labels(logic, b.segmentation).array)
    other.removeFromScene()


# --- linked layout ---------------------------------------------------------------------------------------------------
def test_layout_is_registered_and_views_are_linked(app, logic, run, layout):
    from PathARModuleLib.logic import LAYOUT_ID_BASE, PATHAR_VIEW_GROUP, PATHOSYN_VIEW_GROUP

    layoutNode = logic._layoutNode()
    assert layout.layoutId == LAYOUT_ID_BASE + N
    assert layoutNode.IsLayoutDescription(layout.layoutId)
    assert layoutNode.GetViewArrangement() == layout.layoutId
    assert "PathARSlice2" in layoutNode.GetLayoutDescription(layout.layoutId)
    assert len(layout.viewNodes) == len(layout.sliceNodes) == len(layout.cameraNodes) == N
    for view, camera in zip(layout.viewNodes, layout.cameraNodes):
        assert view.GetScene() is app.scene and view.GetLinkedControl()
        assert view.GetViewGroup() == PATHAR_VIEW_GROUP and camera.GetLayoutName() == view.GetLayoutName()
    for node, composite in zip(layout.sliceNodes, layout.sliceCompositeNodes):
        assert composite.GetLinkedControl() and composite.GetLayoutName() == node.GetLayoutName()
        assert node.GetViewGroup() == PATHAR_VIEW_GROUP
    assert all(n.GetViewGroup() == PATHOSYN_VIEW_GROUP for n in layout.pathoSynSliceNodes)
    # slices and cameras aim at the mean of the samples' lesion centres (every sample's lesion, not the first's)
    labels = [segment_labels(logic, s.segmentation) for s in run.samples]
    centroids = [(lab.ijk_to_ras() @ np.r_[np.argwhere(lab.array > 0)[:, ::-1].mean(axis=0), 1.0])[:3]
                 for lab in labels]
    from PathARModuleLib.logic import segmentationCentreRAS

    aim = np.mean([segmentationCentreRAS(s.segmentation) for s in run.samples], axis=0)  # box centres
    assert np.linalg.norm(aim - np.mean(centroids, axis=0)) < 8.0
    for node in layout.sliceNodes:
        matrix = node.GetSliceToRAS()
        assert np.allclose([matrix.GetElement(r, 3) for r in range(3)], aim, atol=2.5)
    assert all(np.allclose(camera.GetFocalPoint(), aim, atol=2.5) for camera in layout.cameraNodes)


def test_pathosyn_result_is_shown_on_the_left(app, logic, layout):
    from PathARModuleLib.logic import PATHOSYN_SLICE_TAGS

    head, source = add_target(app, shape=(40, 48, 44), name="pathosyn input")
    output = app.add_volume(head.array + 1, head.ijk_to_ras(), "pathosyn output")
    labels = np.zeros(head.shape, np.uint8)
    labels[15:25, 20:28, 18:26] = 2
    seg = logic._pathoSyn.addSegmentationNode(labels, head.ijk_to_ras(), "pathosyn lesion", False, source)
    logic.showPathoSyn(layout, source, output, seg)
    composites = [logic._compositeNode(tag) for tag in PATHOSYN_SLICE_TAGS]
    assert [c.GetBackgroundVolumeID() for c in composites] == [source.GetID(), output.GetID()]
    shown = set(seg.GetDisplayNode().GetViewNodeIDs())
    assert shown >= {n.GetID() for n in (*layout.pathoSynSliceNodes, layout.pathoSynViewNode)}
    standard = {n.GetID() for n in (app.scene.GetSingletonNode("Red", "vtkMRMLSliceNode"),
                                    app.scene.GetSingletonNode("1", "vtkMRMLViewNode")) if n is not None}
    assert shown >= standard  # review B3: the user's other views keep showing it
    assert not shown & {n.GetID() for n in (*layout.viewNodes, *layout.sliceNodes)}  # not in the sample views


def test_camera_change_propagates_to_every_sample_view_only(layout):
    import slicer

    first, *others = layout.cameraNodes
    pathoSynCamera = [c for c in _all(first.GetScene(), "vtkMRMLCameraNode")
                      if c.GetLayoutName() == layout.pathoSynViewNode.GetLayoutName()]
    untouched = [tuple(c.GetPosition()) for c in pathoSynCamera]
    target = np.array(first.GetFocalPoint()) + np.array([0.0, -250.0, 40.0])
    first.SetInteractionFlags(slicer.vtkMRMLCameraNode.CameraInteractionFlag)
    first.InteractingOn()
    first.SetPosition(*target)
    first.InteractingOff()
    for camera in others:
        assert np.allclose(camera.GetPosition(), target), "linked 3D cameras did not follow"
        assert np.allclose(camera.GetFocalPoint(), first.GetFocalPoint())
    assert [tuple(c.GetPosition()) for c in pathoSynCamera] == untouched


def test_slice_scroll_propagates_across_sample_slice_views_only(layout):
    import slicer

    first, *others = layout.sliceNodes
    pathoSyn = [n.GetSliceOffset() for n in layout.pathoSynSliceNodes]
    offset = first.GetSliceOffset() + 7.0
    first.SetInteractionFlags(slicer.vtkMRMLSliceNode.SliceToRASFlag)
    first.InteractingOn()
    first.SetSliceOffset(offset)
    first.InteractingOff()
    for node in others:
        assert node.GetSliceOffset() == pytest.approx(offset)
    assert [n.GetSliceOffset() for n in layout.pathoSynSliceNodes] == pathoSyn


def test_switching_modality_keeps_the_structure(logic, run, layout):
    from scripted_models.errors import InputError

    masks = [segment_labels(logic, s.segmentation).array.copy() for s in run.samples]
    shown = [s.segmentation.GetDisplayNode().GetViewNodeIDs() for s in run.samples]
    for mod in (MODS[1], MODS[0]):
        logic.showModality(run, layout, mod)
        for i, sample in enumerate(run.samples):
            assert layout.sliceCompositeNodes[i].GetBackgroundVolumeID() == sample.volumes[mod].GetID()
            assert np.array_equal(segment_labels(logic, sample.segmentation).array, masks[i])
            assert sample.segmentation.GetDisplayNode().GetViewNodeIDs() == shown[i]
    # each sample is shown only in its own 3D and slice view
    for i in range(len(run.samples)):
        assert set(shown[i]) == {layout.viewNodes[i].GetID(), layout.sliceNodes[i].GetID()}
    with pytest.raises(InputError, match="t2"):
        logic.showModality(run, layout, "t2")


def test_volume_rendering_follows_the_modality_in_each_sample_view(app, logic, run, layout):
    from PathARModuleLib.offscreen import applicationLogic, renderThreeDView

    vr = logic._volumeRenderingLogic()
    for mod, other in ((MODS[1], MODS[0]), (MODS[0], MODS[1])):
        logic.showModality(run, layout, mod)
        for i, sample in enumerate(run.samples):
            shown = vr.GetFirstVolumeRenderingDisplayNode(sample.volumes[mod])
            assert shown is not None and shown.GetVisibility()
            assert list(shown.GetViewNodeIDs()) == [layout.viewNodes[i].GetID()]
            hidden = vr.GetFirstVolumeRenderingDisplayNode(sample.volumes[other])
            assert hidden is None or not hidden.GetVisibility()
    # the rendering adds to the 3D picture, and switching it off removes it again
    appLogic = applicationLogic(app.scene)
    with_vr = renderThreeDView(layout.viewNodes[0], appLogic, (160, 160)).astype(int)
    logic.setVolumeRendering(run.samples[0].volumes[MODS[0]], None)
    without_vr = renderThreeDView(layout.viewNodes[0], appLogic, (160, 160)).astype(int)
    logic.showModality(run, layout, MODS[0])
    assert (np.abs(with_vr - without_vr).sum(axis=2) > 30).mean() > 0.01


# --- masks handed to PathoSyn ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction,spacing", [(None, (1.0, 1.0, 1.0)),
                                               ((0.96, -0.28, 0, 0.28, 0.96, 0, 0, 0, 1), (1.2, 0.9, 1.5))])
def test_placed_mask_lands_at_the_clicked_point_with_its_volume(app, logic, run, direction, spacing):
    sample = run.samples[0]
    lesion = segment_labels(logic, sample.segmentation)
    # a head large enough that the lesion, placed near its centre, cannot stick out (nothing is clipped)
    extent_mm = np.ptp(np.argwhere(lesion.array > 0), axis=0).max() * max(lesion.spacing)
    shape = tuple(int(np.ceil((2.4 * extent_mm + 10) / s)) for s in reversed(spacing))
    head, target = add_target(app, direction=direction, spacing=spacing, shape=shape)
    before = array_of(target).copy()
    ijk = np.array(head.shape[::-1]) * np.array([0.45, 0.55, 0.5])
    point = (ijk_to_ras(target) @ np.r_[ijk, 1.0])[:3]
    placed = logic.placeMask(sample.segmentation, target, point)
    labels = segment_labels(logic, placed)
    on_grid = logic._pathoSyn.maskFromNode(placed, target)[0].array
    assert on_grid.shape == head.shape
    assert np.linalg.norm(centroid_ras(target, on_grid) - point) <= max(spacing)  # within one voxel
    lesion_ml = (lesion.array > 0).sum() * np.prod(lesion.spacing)
    placed_ml = (on_grid > 0).sum() * np.prod(spacing)
    assert abs(placed_ml / lesion_ml - 1) < 0.05
    assert set(np.unique(labels.array)) <= {0, 1, 2, 3} and logic.lastPlacement["lost_fraction"] == 0
    assert np.array_equal(array_of(target), before)  # the healthy scan is untouched


def test_placed_mask_lands_at_the_clicked_point_of_a_transformed_scan(app, logic, run):
    """A scan under a (not hardened) transform: the click is a world point, the lesion is centred there in the
    views, and the new segmentation follows the scan's transform."""
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    head, target = add_target(app, shape=(70, 80, 80))
    moved = vtkMatrix4x4()
    moved.SetElement(0, 3, 30.0), moved.SetElement(1, 3, -12.0), moved.SetElement(0, 1, -1.0)
    moved.SetElement(1, 0, 1.0), moved.SetElement(0, 0, 0.0), moved.SetElement(1, 1, 0.0)  # 90 degrees about S
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    transform.SetMatrixTransformToParent(moved)
    target.SetAndObserveTransformNodeID(transform.GetID())
    local = (ijk_to_ras(target) @ np.r_[np.array(head.shape[::-1]) * np.array([0.45, 0.55, 0.5]), 1.0])[:3]
    world = (matrix_from_vtk(moved) @ np.r_[local, 1.0])[:3]
    placed = logic.placeMask(run.samples[0].segmentation, target, world)
    assert placed.GetParentTransformNode() is transform
    on_grid = logic._pathoSyn.maskFromNode(placed, target)[0].array
    assert np.linalg.norm(centroid_ras(target, on_grid) - local) <= 1.0  # within one voxel, in the scan's own RAS


def test_a_sample_with_one_sub_region_keeps_its_label_when_placed(app, logic):
    """A PathAR sample may have a single segment (only edema): placing it keeps label 2, it does not become a
    whole-lesion mask (label 1) as a single unnamed segment would."""
    head, target = add_target(app)
    lesion = np.zeros((20, 20, 20), np.uint8)
    lesion[6:14, 5:15, 6:13] = 2
    for value, expected in ((2, 2), (3, 3), (1, 1)):
        sample = logic._pathoSyn.addSegmentationNode(np.where(lesion > 0, value, 0).astype(np.uint8),
                                                     np.diag([2.0, 2.0, 2.0, 1.0]), f"only {value}", wholeLesion=False)
        point = (ijk_to_ras(target) @ np.r_[np.array(head.shape[::-1]) / 2.0, 1.0])[:3]
        placed = logic.placeMask(sample, target, point)
        assert set(np.unique(segment_labels(logic, sample).array)) - {0} == {expected}
        assert set(np.unique(logic._pathoSyn.maskFromNode(placed, target)[0].array)) == {0, expected}


def test_mask_sticking_out_is_clipped_with_a_warning(app, logic, run, caplog):
    head, target = add_target(app, shape=(60, 70, 80))
    corner = (ijk_to_ras(target) @ np.r_[0.0, 0.0, 30.0, 1.0])[:3]
    placed = logic.placeMask(run.samples[0].segmentation, target, corner)
    lost = logic.lastPlacement["lost_fraction"]
    assert 0.3 < lost < 1.0 and "clipped" in logic.lastPlacement["warning"]
    assert any("clipped" in r.getMessage() for r in caplog.records)
    lesion = segment_labels(logic, run.samples[0].segmentation)
    on_grid = logic._pathoSyn.maskFromNode(placed, target)[0].array
    kept_ml = (on_grid > 0).sum() / 1000.0
    lesion_ml = (lesion.array > 0).sum() * np.prod(lesion.spacing) / 1000.0
    # the reported loss accounts for the clipped volume to within 3 % of the lesion (the kept part is a small
    # corner wedge whose nearest-neighbour surface costs more than 3 % of itself)
    assert abs(kept_ml - (1 - lost) * lesion_ml) <= 0.03 * lesion_ml


def test_bad_inputs_raise_one_line_and_leave_the_scene(app, logic, run, monkeypatch, tmp_path):
    from scripted_models.errors import InputError, WeightsError

    head, target = add_target(app, shape=(40, 48, 44), name="small")
    before = app.node_ids()
    far = (ijk_to_ras(target) @ np.r_[500.0, 0.0, 0.0, 1.0])[:3]
    cases = [
        (lambda: logic.placeMask(run.samples[0].segmentation, target, far), "outside"),
        (lambda: logic.placeMask(run.samples[0].segmentation, None, [0, 0, 0]), "no healthy scan"),
        (lambda: logic.placeMask(run.samples[0].segmentation, target, None), "click a point"),
        (lambda: logic.placeMask(None, target, [0, 0, 0]), "segmentation"),
        (lambda: logic.generateSamples([], n=1), "modality"),
        (lambda: logic.generateSamples(["t1"], n=5), "1 to 4"),
        (lambda: logic.generateSamples(["pd"], n=1), "pd"),
        (lambda: logic.generateSamples(["t1"], n=1, temperature=0), "temperature"),
    ]
    for call, words in cases:
        with pytest.raises(InputError) as info:
            call()
        message = str(info.value)
        assert words in message and "\n" not in message, message
        assert app.node_ids() == before, f"the scene changed after: {message}"
    monkeypatch.setenv("PATHOSYN_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    with pytest.raises(WeightsError) as info:
        logic.generateSamples(["t1c"], n=1)
    assert "\n" not in str(info.value) and app.node_ids() == before


def test_use_mask_in_pathosyn_then_synthesize(app, logic, run):
    from PathoSynSlicerLib import parameters as P
    from PathoSynSlicerLib.logic import PathoSynSlicerLogic

    head, target = add_target(app, shape=(80, 90, 84))
    point = (ijk_to_ras(target) @ np.r_[np.array(head.shape[::-1]) / 2.0, 1.0])[:3]
    smallest = min(run.samples, key=lambda s: int((segment_labels(logic, s.segmentation).array > 0).sum()))
    placed = logic.placeMask(smallest.segmentation, target, point)
    params = logic.useMaskInPathoSyn(placed, target, modality="t1")
    pathoSyn = PathoSynSlicerLogic(app.scene)
    stored = pathoSyn.getParameters()
    assert stored.maskSegmentation is placed and stored.t1Volume is target and not stored.useLabelmap
    out = pathoSyn.synthesize(P.inputVolumes(params), P.maskNode(params), steps=2)
    expected = pathoSyn.maskFromNode(placed, target)[0].array
    produced = pathoSyn.maskFromNode(out.segmentation, target)[0].array
    assert np.array_equal(produced > 0, expected > 0)  # the lesion has the PathAR sample's shape
    assert (array_of(out.volumes["t1"]) != array_of(target))[expected > 0].any()


def test_a_second_lesion_is_added_to_the_current_mask(app, logic, run):
    """Two PathAR samples placed at two points, the second added to the first's mask: one segmentation with both
    lesions where they were placed (each as when placed alone); the first mask is not changed."""
    from scipy import ndimage

    head, target = add_target(app, shape=(90, 110, 170))
    size = np.array(head.shape[::-1])
    left, right = ((ijk_to_ras(target) @ np.r_[size * np.array([f, 0.5, 0.5]), 1.0])[:3] for f in (0.2, 0.8))
    first = logic.placeMask(run.samples[0].segmentation, target, left)
    first_labels = logic._pathoSyn.maskFromNode(first, target)[0].array.copy()
    alone = logic._pathoSyn.maskFromNode(logic.placeMask(run.samples[1].segmentation, target, right), target)[0].array
    both = logic.placeMask(run.samples[1].segmentation, target, right, addTo=first)
    labels = logic._pathoSyn.maskFromNode(both, target)[0].array
    assert both is not first and "+" in both.GetName()
    assert np.array_equal(logic._pathoSyn.maskFromNode(first, target)[0].array, first_labels)  # input unchanged
    assert not (first_labels.astype(bool) & alone.astype(bool)).any()  # 100 mm apart: no overlap
    assert np.array_equal(labels, np.maximum(first_labels, alone))  # each lesion as when placed on its own
    assert ndimage.label(labels > 0)[1] >= 2
    names = {both.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(both.GetSegmentation().GetNumberOfSegments())}
    assert names <= {"necrotic or non-enhancing core", "edema", "enhancing tumour"}
    from PathoSynSlicerLib.logic import PathoSynSlicerLogic

    out = PathoSynSlicerLogic(app.scene).synthesize({"t1": target}, both, steps=2)  # each lesion in its own ROI
    assert len(out.report["rois"]) == 2, out.report.get("rois")
    changed = array_of(out.volumes["t1"]) != array_of(target)
    assert all(changed[component].any() for component in (first_labels > 0, alone > 0))


def test_overlapping_lesions_keep_nested_sub_regions_and_a_labelmap_can_be_added_to(app, logic):
    """Where the added lesion overlaps the current mask, core beats enhancing beats edema, whichever came first;
    a BraTS labelmap (4 = enhancing) on a grid of its own is read in its canonical values on the scan's grid."""
    head, target = add_target(app, shape=(60, 60, 60))
    cube = np.zeros((16, 16, 16), np.uint8)
    cube[2:14, 2:14, 2:14] = 2  # edema
    cube[5:11, 5:11, 5:11] = 1  # core inside
    sample = logic._pathoSyn.addSegmentationNode(cube, np.eye(4), "cube", wholeLesion=False)
    centre = (ijk_to_ras(target) @ np.r_[30.0, 30.0, 30.0, 1.0])[:3]
    current = np.zeros((30, 30, 30), np.uint8)  # a labelmap grid 10 voxels into the scan's: edema, enhancing (4)
    current[5:25, 5:25, 5:25] = 2
    current[16:24, 16:24, 16:24] = 4
    shift = np.eye(4)
    shift[:3, 3] = 10.0
    labelmap = app.add_volume(current, ijk_to_ras(target) @ shift, "brats labels", labelmap=True)
    before = array_of(labelmap).copy()
    placed = logic.placeMask(sample, target, centre, addTo=labelmap)
    labels = logic._pathoSyn.maskFromNode(placed, target)[0].array
    alone = logic._pathoSyn.maskFromNode(logic.placeMask(sample, target, centre), target)[0].array
    assert np.array_equal(array_of(labelmap), before)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert (labels[alone == 1] == 1).all()  # core over the labelmap's enhancing and edema
    enhancing = np.zeros(head.shape, bool)
    enhancing[26:34, 26:34, 26:34] = True  # the labelmap's 4s on the scan's grid
    assert (labels[enhancing & (alone == 2)] == 3).all()  # enhancing over the cube's edema
    assert (labels[(alone == 0) & ~enhancing][labels[(alone == 0) & ~enhancing] > 0] == 2).all()


def test_adding_sub_regions_to_a_whole_lesion_is_refused(app, logic, run):
    """A whole-lesion mask (the model invents its structure) would silently become necrotic core beside a PathAR
    lesion with sub-regions: one line, scene unchanged. A core-only lesion is added as whole lesion."""
    from scripted_models.errors import InputError

    head, target = add_target(app, shape=(60, 70, 80))
    blob = np.zeros(head.shape, np.uint8)
    blob[20:30, 20:30, 20:30] = 1
    whole = app.add_segmentation(blob, ijk_to_ras(target), {1: "Tumor"}, node_name="painted")
    point = (ijk_to_ras(target) @ np.r_[55.0, 40.0, 35.0, 1.0])[:3]
    before = app.node_ids()
    with pytest.raises(InputError) as info:
        logic.placeMask(run.samples[0].segmentation, target, point, addTo=whole)
    assert "whole lesion" in str(info.value) and "\n" not in str(info.value)
    assert app.node_ids() == before
    core = np.zeros((12, 12, 12), np.uint8)
    core[3:9, 3:9, 3:9] = 1
    coreOnly = logic._pathoSyn.addSegmentationNode(core, np.eye(4), "core only", wholeLesion=False)
    placed = logic.placeMask(coreOnly, target, point, addTo=whole)
    labels, wholeLesion = logic._pathoSyn.maskFromNode(placed, target)
    assert wholeLesion and set(np.unique(labels.array)) == {0, 1}
    assert labels.array[blob > 0].all() and labels.array.sum() == blob.sum() + 216


# --- figure ----------------------------------------------------------------------------------------------------------
def _all(scene, cls):
    nodes = scene.GetNodesByClass(cls)
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def lesion_pixels(rgb: np.ndarray) -> np.ndarray:
    """Pixels with a sub-region colour (green/red/yellow surfaces); the 3D background is blue-grey."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return ((g - b > 40) | (r - b > 60)) & (np.maximum(r, g) > 60)


def test_offscreen_render_shows_every_sample(app, logic, run, layout, tmp_path):
    from PathARModuleLib.offscreen import renderViews

    logic.showModality(run, layout, MODS[0])
    views = renderViews(app.scene, layout, size=(240, 240))
    assert len(views["3d"]) == len(views["slices"]) == N
    for i, img in enumerate(views["3d"]):
        assert img.shape == (240, 240, 3)
        assert lesion_pixels(img).mean() > 0.01, f"3D view {i + 1} shows no lesion surface"
    for i, img in enumerate(views["slices"]):
        assert (img.max(axis=2) > 20).mean() > 0.2, f"slice view {i + 1} is blank"
    assert (views["3d"][0] != views["3d"][1]).any(axis=2).mean() > 0.005  # different samples, different pictures
    path = logic.exportFigure(layout, tmp_path / "figure.png", size=(200, 200))
    from PIL import Image

    with Image.open(path) as img:
        assert img.size == (2 * 200 + 4, 2 * 200 + 4)


@pytest.mark.skipif(os.environ.get("PATHOSYN_WRITE_SCREENSHOT") != "1",
                    reason="set PATHOSYN_WRITE_SCREENSHOT=1 to regenerate Resources/Screenshots/pathar.png")
def test_write_module_screenshot(logic):
    """The module screenshot: 4 samples (linked 3D row over the FLAIR slice row)."""
    run4 = logic.generateSamples(["t1c", "flair"], n=4, seed=0)
    layout4 = logic.createLinkedLayout(run4, modality="flair")
    logic.exportFigure(layout4, SCREENSHOT, size=(300, 300))
    run4.removeFromScene()


def test_screenshot_file_is_committed_and_shows_samples():
    from PIL import Image

    assert SCREENSHOT.is_file(), f"{SCREENSHOT} missing: run the render test with PATHOSYN_WRITE_SCREENSHOT=1"
    img = np.asarray(Image.open(SCREENSHOT).convert("RGB"))
    assert img.shape[1] >= 600 and lesion_pixels(img[: img.shape[0] // 2]).mean() > 0.01


def test_parameters_survive_scene_save_and_reload(app, logic, tmp_path):
    """Last in this file: reloading the .mrb clears the shared scene."""
    params = logic.getParameters()
    params.seed, params.temperature, params.numberOfSamples, params.renderT2 = 11, 0.8, 3, True
    params.displayedModality = "t2"
    path = app.save_mrb(tmp_path / "pathar.mrb")
    params.seed, params.renderT2 = 0, False
    app.load_mrb(path)
    from PathARModuleLib.parameters import renderModalities

    restored = logic.getParameters()
    assert (restored.seed, restored.temperature, restored.numberOfSamples) == (11, 0.8, 3)
    assert renderModalities(restored) == ["t1c", "t2", "flair"] and restored.displayedModality == "t2"
