"""PathoSyn Slicer module on a real (headless) MRML scene from the slicer-core wheel. The engine is not stubbed."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_ball_mask, make_head

pytest.importorskip("slicer")

from slicer_scene import SlicerScene, array_of, engine_process, ijk_to_ras, save_png  # noqa: E402

STEPS = 2  # keep the tests fast; the quality of the output is tested elsewhere
SCREENSHOT = ROOT / "Resources" / "Screenshots" / "pathosyn.png"

OBLIQUE = tuple(np.round([np.cos(0.3), -np.sin(0.3), 0, np.sin(0.3), np.cos(0.3), 0, 0, 0, 1], 12))
FLIPPED = (0, 1, 0, 1, 0, 0, 0, 0, -1)  # axes swapped and one flipped (det = +1 after the LPS/RAS flip too)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """CPU rule: the machine is shared with training jobs."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def app():
    return SlicerScene()


@pytest.fixture()
def logic(app):
    from PathoSynSlicerLib.logic import PathoSynSlicerLogic

    return PathoSynSlicerLogic()


def add_head(app, direction=None, spacing=(1.2, 1.0, 1.5), name="head", seed=0):
    head = make_head(direction=direction, spacing=spacing, seed=seed)
    return head, app.add_volume(head.array, head.ijk_to_ras(), name)


SUBREGION_SEGMENTS = {1: "Necrotic core", 2: "Edema", 3: "Enhancing tumor"}


def snapshot(app, nodes):
    return {n.GetID(): (array_of(n), ijk_to_ras(n), n.GetName()) for n in nodes}, app.node_ids()


def assert_unchanged(app, nodes, before):
    arrays, ids = before
    assert app.node_ids() == ids, "the scene gained or lost nodes"
    for n in nodes:
        a, m, name = arrays[n.GetID()]
        assert np.array_equal(array_of(n), a)
        assert np.array_equal(ijk_to_ras(n), m)
        assert n.GetName() == name


# --- conversion helpers -----------------------------------------------------------------------------------------------
def test_segment_names_map_to_canonical_subregions():
    from PathoSynSlicerLib.logic import subregionForSegmentName as f

    assert f("Necrotic core") == 1 and f("NCR/NET") == 1 and f("non-enhancing tumour") == 1
    assert f("Edema") == 2 and f("peritumoral oedema") == 2 and f("ED") == 2
    assert f("Enhancing tumor") == 3 and f("ET") == 3
    assert f("Segment_1") is None and f("lesion") is None


def test_done_message_carries_the_engine_warnings():
    """The status line after a synthesis (Slicer and browser) names the new volumes and repeats the engine's
    warnings, such as a raw scan normalised over its whole head."""
    from PathoSynSlicerLib.logic import synthesisDoneMessage

    assert synthesisDoneMessage({"timing_s": {"total": 2.34}}, ["t1 lesion", "flair lesion"]) == \
        "Done in 2.3 s: t1 lesion, flair lesion"
    assert synthesisDoneMessage({"warnings": ["the background is noise", "lesion ROI too large"]}, ["t1 lesion"]) == \
        "Done: t1 lesion. Warning: the background is noise. Warning: lesion ROI too large"


@pytest.mark.parametrize("direction", [None, OBLIQUE, FLIPPED], ids=["axial", "oblique", "flipped"])
def test_volume_roundtrip_keeps_geometry(app, logic, direction):
    head, node = add_head(app, direction=direction)
    vol = logic.volumeFromNode(node)
    assert vol.same_grid(head, tol=1e-9)
    assert np.array_equal(vol.array, head.array)
    back = logic.addVolumeNode(vol, "copy")
    assert np.allclose(ijk_to_ras(back), ijk_to_ras(node), atol=1e-12)


# --- synthesis on MRML nodes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", [OBLIQUE, FLIPPED], ids=["oblique", "flipped"])
def test_synthesize_segmentation_outputs_new_nodes_exact_geometry(app, logic, direction):
    head, node = add_head(app, direction=direction, spacing=(1.3, 0.9, 2.0))
    mask = make_ball_mask(head)
    seg = app.add_segmentation(mask.array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    before = snapshot(app, [node])
    seg_before = seg.GetSegmentation().GetNumberOfSegments()

    out = logic.synthesize(node, seg, modality="t1", seed=1, samples=2, steps=STEPS)

    # inputs untouched
    assert np.array_equal(array_of(node), before[0][node.GetID()][0])
    assert seg.GetSegmentation().GetNumberOfSegments() == seg_before
    # new nodes, named after the input, with exactly the input's IJK-to-RAS
    new = out.nodes()
    assert not ({n.GetID() for n in new} & before[1])
    assert out.volumes["t1"].GetName() == "head synthesized"
    assert out.residuals["t1"].GetName() == "head residual"
    assert out.uncertainty["t1"].GetName() == "head uncertainty"
    for n in (out.volumes["t1"], out.residuals["t1"], out.uncertainty["t1"]):
        assert np.array_equal(ijk_to_ras(n), ijk_to_ras(node))
        assert array_of(n).shape == head.shape
    synth = array_of(out.volumes["t1"])
    assert synth.dtype == head.array.dtype
    changed = synth != head.array
    assert changed.any()
    # voxels outside the (dilated) lesion are copied bit for bit; changes stay near the lesion
    far = _distance_mm(mask.array > 0, head.spacing) > 6.0 + max(head.spacing)  # engine blend margin: 6 mm
    assert not changed[far].any()
    residual = array_of(out.residuals["t1"])
    assert residual.dtype == np.float32 and np.abs(residual).max() > 0
    assert (array_of(out.uncertainty["t1"]) >= 0).all()
    # residual display: diverging colours centred on 0
    display = out.residuals["t1"].GetDisplayNode()
    assert display.GetLevel() == 0.0
    assert "Diverging" in app.scene.GetNodeByID(display.GetColorNodeID()).GetName()
    # lesion segmentation with canonical names and colours
    from scripted_models.labels import SUBREGION_COLORS, SUBREGION_NAMES

    segmentation = out.segmentation.GetSegmentation()
    names = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegment(i).GetColor()
             for i in range(segmentation.GetNumberOfSegments())}
    assert set(names) == set(SUBREGION_NAMES.values())
    for value, name in SUBREGION_NAMES.items():
        assert np.allclose(names[name], SUBREGION_COLORS[value])
    assert out.report["lesion_voxels"] == int((mask.array > 0).sum())
    assert out.report["whole_lesion_only"] is False
    # the segmentation (built from bounding-box crops of each sub-region) gives back the engine's labels exactly
    from PathoSynSlicerLib.logic import PathoSynSlicerLogic

    engine_mask, _ = PathoSynSlicerLogic().maskFromNode(seg, node)
    assert np.array_equal(_segmentation_labels(out.segmentation, node), engine_mask.array)
    # displays set directly (no automatic window/level pass): the input's, the residual's diverging one centred on
    # 0, the uncertainty's from 0 to its largest value
    source = node.GetDisplayNode()
    shown = out.volumes["t1"].GetDisplayNode()
    assert not shown.GetAutoWindowLevel()
    assert (shown.GetWindow(), shown.GetLevel()) == (source.GetWindow(), source.GetLevel())
    assert display.GetWindow() == pytest.approx(2 * np.abs(residual).max(), rel=1e-5)
    spread = out.uncertainty["t1"].GetDisplayNode()
    top = float(array_of(out.uncertainty["t1"]).max())
    assert spread.GetWindow() == pytest.approx(top, rel=1e-5) and spread.GetLevel() == pytest.approx(top / 2, rel=1e-5)


def _distance_mm(mask, spacing_xyz):
    from scipy import ndimage

    return ndimage.distance_transform_edt(~mask, sampling=tuple(reversed(spacing_xyz)))


def test_single_segment_is_whole_lesion_and_dict_of_modalities(app, logic):
    head, t1 = add_head(app, name="T1 scan")
    t2head = make_head(seed=3)
    t2 = app.add_volume(t2head.array, t2head.ijk_to_ras(), "T2 scan")
    mask = make_ball_mask(head, labels=False)
    seg = app.add_segmentation(mask.array, head.ijk_to_ras(), {1: "Segment_1"})
    out = logic.synthesize({"t1": t1, "T2": t2}, seg, steps=STEPS)
    assert set(out.volumes) == {"t1", "t2"}
    assert out.volumes["t2"].GetName() == "T2 scan synthesized"
    assert out.report["whole_lesion_only"] is True
    segmentation = out.segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetNthSegment(0).GetName() == "lesion"
    assert out.uncertainty == {}


def test_labelmap_mask_on_a_different_grid(app, logic):
    """A labelmap with its own (coarser, shifted, oblique) grid: the engine resamples it (nearest)."""
    head, node = add_head(app)
    fine = make_ball_mask(head)
    # the same ball described on a 2x coarser grid with a rotation: build it in physical space
    from scripted_models.volume import resample_to

    coarse_grid = centred_grid(head, (24, 28, 26), spacing=(2.0, 1.9, 2.1), direction=OBLIQUE, shift=(3, -4, 2))
    coarse = resample_to(fine, coarse_grid, nearest=True)
    assert coarse.array.any() and not coarse.same_grid(head)
    label = app.add_volume(coarse.array.astype(np.uint8), coarse.ijk_to_ras(), "mask", labelmap=True)
    label_before = array_of(label)
    out = logic.synthesize(node, label, steps=STEPS)
    assert np.array_equal(array_of(label), label_before)
    got = _segmentation_labels(out.segmentation, node)
    expected = resample_to(coarse, head, nearest=True).array
    assert np.array_equal(got, expected)
    assert np.array_equal(ijk_to_ras(out.volumes["t1"]), ijk_to_ras(node))


def test_segmentation_on_a_different_grid(app, logic):
    head, node = add_head(app)
    mask = make_ball_mask(head)
    from scripted_models.volume import resample_to

    other = centred_grid(head, (30, 36, 33), spacing=(1.6, 1.3, 2.0), direction=FLIPPED)
    moved = resample_to(mask, other, nearest=True)
    assert moved.array.any() and not moved.same_grid(head)
    seg = app.add_segmentation(moved.array, moved.ijk_to_ras(), SUBREGION_SEGMENTS)
    prepared = logic.prepare(node, seg)
    assert prepared.mask.same_grid(head, tol=1e-9)
    expected = resample_to(moved, head, nearest=True).array
    agree = (prepared.mask.array == expected).mean()
    assert agree > 0.995, agree  # VTK and ITK nearest-neighbour may differ on exact voxel-boundary ties
    assert prepared.wholeLesion is False and set(np.unique(prepared.mask.array)) == {0, 1, 2, 3}


def test_closed_surface_segmentation_is_voxelized_on_the_scan_grid(app, logic):
    """A segmentation with only closed surfaces (an STL/OBJ import) is voxelized once, on the scan's grid: the
    voxels Slicer's Segment Editor shows with this scan as source volume. (Without a geometry Slicer chose a
    ~0.01-0.06 mm grid of its own: a minute per click and different voxels.) The input keeps its representations."""
    import slicer

    head, node = add_head(app)
    seg = app.add_segmentation(make_ball_mask(head, radius_vox=7).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    segmentation = seg.GetSegmentation()
    segmentation.CreateRepresentation(surface)
    segmentation.SetSourceRepresentationName(surface)
    segmentation.RemoveRepresentation(binary)

    got, whole = logic.maskFromNode(seg, node)

    assert not segmentation.ContainsRepresentation(binary)
    editor_view = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "as the Segment Editor shows it")
    editor_view.GetSegmentation().DeepCopy(segmentation)
    editor_view.SetReferenceImageGeometryParameterFromVolumeNode(node)
    assert editor_view.GetSegmentation().CreateRepresentation(binary)
    expected, _ = logic.maskFromNode(editor_view, node)
    assert whole is False and set(np.unique(expected.array)) == {0, 1, 2, 3}
    assert np.array_equal(got.array, expected.array)


def test_segments_never_painted_are_ignored(app, logic):
    """The Segment Editor's "Add" leaves an empty "Segment_2": it neither blocks the name mapping nor turns a
    one-segment (whole lesion) mask into sub-regions; and sub-regions painted in part (only edema of core / edema /
    enhancing) stay sub-regions."""
    head, node = add_head(app)
    mask = make_ball_mask(head)
    seg = app.add_segmentation(mask.array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    seg.GetSegmentation().AddEmptySegment("", "Segment_4")
    expected, _ = logic.maskFromNode(app.add_segmentation(mask.array, head.ijk_to_ras(), SUBREGION_SEGMENTS), node)
    got, whole = logic.maskFromNode(seg, node)
    assert whole is False and np.array_equal(got.array, expected.array)

    tumour = app.add_segmentation((mask.array > 0).astype(np.uint8), head.ijk_to_ras(), {1: "Tumor"})
    tumour.GetSegmentation().AddEmptySegment("", "Segment_2")
    got, whole = logic.maskFromNode(tumour, node)
    assert whole is True and np.array_equal(got.array, (mask.array > 0).astype(np.uint8))

    edema_only = app.add_segmentation(np.where(mask.array > 0, 2, 0), head.ijk_to_ras(), SUBREGION_SEGMENTS)
    got, whole = logic.maskFromNode(edema_only, node)
    assert whole is False and set(np.unique(got.array)) == {0, 2}


def test_a_label_file_loaded_as_a_segmentation_gets_a_hint(app, logic, tmp_path):
    """Slicer names the segments of a BraTS label file loaded as a segmentation "Segment_1/2/4": the error says to
    load it as a labelmap, whose values the engine maps. Segments whose names are not "Segment_<label value>" get no
    such hint."""
    import SimpleITK as sitk

    from scripted_models.errors import InputError

    head, node = add_head(app)
    labels = make_ball_mask(head).array.copy()
    labels[labels == 3] = 4
    path = tmp_path / "brats_seg.nii.gz"
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(head.spacing), image.SetOrigin(head.origin), image.SetDirection(head.direction)
    sitk.WriteImage(image, str(path))
    loaded = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brats_seg")
    storage = app.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(loaded)
    with pytest.raises(InputError, match="'Segment_1', 'Segment_2', 'Segment_4'.*load it as a labelmap volume"):
        logic.maskFromNode(loaded, node)
    painted = app.add_segmentation(labels, head.ijk_to_ras(), {1: "Segment_1", 2: "Segment_2"})  # both value 1
    assert [painted.GetSegmentation().GetNthSegment(i).GetLabelValue() for i in range(2)] == [1, 1]
    with pytest.raises(InputError, match="cannot map") as info:
        logic.maskFromNode(painted, node)
    assert "labelmap" not in str(info.value)
    labelmap = app.add_volume(labels, head.ijk_to_ras(), "brats_seg", labelmap=True)
    mask, _ = logic.maskFromNode(labelmap, node)
    assert set(np.unique(mask.array)) == {0, 1, 2, 4}  # canonical values are mapped by the engine (4 -> 3)


def test_a_scan_whose_image_extent_does_not_start_at_zero(app, logic):
    """VTK places voxel (i, j, k) of an image whose extent starts at (5, -3, 2) at IJK (5+i, -3+j, 2+k): the
    outputs must sit where the input's voxels are, as for the same scan stored with its extent at 0."""
    head, node = add_head(app)
    start = np.array([5, -3, 2])
    moved = head.ijk_to_ras().copy()
    moved[:3, 3] -= moved[:3, :3] @ start
    shifted = app.add_volume(head.array, moved, "shifted extent")
    shifted.GetImageData().SetExtent(5, 5 + head.shape[2] - 1, -3, -3 + head.shape[1] - 1, 2, 2 + head.shape[0] - 1)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)

    plain = logic.synthesize(node, seg, steps=STEPS)
    out = logic.synthesize(shifted, seg, steps=STEPS)

    for new, old in ((out.volumes["t1"], plain.volumes["t1"]), (out.residuals["t1"], plain.residuals["t1"])):
        assert np.allclose(ijk_to_ras(new), ijk_to_ras(old)) and np.array_equal(array_of(new), array_of(old))
    assert np.array_equal(_segmentation_labels(out.segmentation, node), _segmentation_labels(plain.segmentation, node))


def test_segment_export_resamples_only_the_segments_box_with_the_whole_grid_result(app, logic):
    """maskFromNode resamples each segment into the box of the reference grid its voxels cover: the same labels as a
    resample onto the whole grid, for segments on an oblique coarser grid, one that reaches past the volume's edge,
    and a reference whose extent does not start at 0."""
    import slicer
    from PathoSynSlicerLib.logic import _orientedArray, _vtkMatrix

    from scripted_models.volume import resample_to

    head, node = add_head(app)
    other = centred_grid(head, (24, 30, 26), spacing=(1.7, 1.4, 2.1), direction=OBLIQUE, shift=(2.5, -3.0, 1.5))
    labels = resample_to(make_ball_mask(head, radius_vox=7), other, nearest=True).array.copy()
    labels[:3, :6, :5] = 2  # edema in a corner that lies partly outside the head's grid
    seg = app.add_segmentation(labels, other.ijk_to_ras(), SUBREGION_SEGMENTS)

    def whole_grid(reference_node):
        """The old export: every segment resampled onto the whole reference grid."""
        image = reference_node.GetImageData()
        reference = slicer.vtkOrientedImageData()
        reference.SetExtent(image.GetExtent())
        reference.SetImageToWorldMatrix(_vtkMatrix(ijk_to_ras(reference_node)))
        shape = tuple(reversed(image.GetDimensions()))
        out = np.zeros(shape, np.uint8)
        segmentation = seg.GetSegmentation()
        for name, value in (("Edema", 2), ("Enhancing tumor", 3), ("Necrotic core", 1)):
            segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
            resampled = slicer.vtkOrientedImageData()
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                segment.GetRepresentation("Binary labelmap"), reference, resampled, False, False)
            out[_orientedArray(resampled, shape) == segment.GetLabelValue()] = value
        return out

    got, _ = logic.maskFromNode(seg, node)
    expected = whole_grid(node)
    assert set(np.unique(expected)) == {0, 1, 2, 3}
    assert np.array_equal(got.array, expected)
    shifted = app.add_volume(head.array, head.ijk_to_ras(), "shifted extent")
    shifted.GetImageData().SetExtent(4, 4 + head.shape[2] - 1, -3, -3 + head.shape[1] - 1, 2, 2 + head.shape[0] - 1)
    got, _ = logic.maskFromNode(seg, shifted)
    assert np.array_equal(got.array, whole_grid(shifted))


def centred_grid(head, shape, spacing, direction, shift=(0.0, 0.0, 0.0)):
    """An empty Volume with another grid whose centre is the centre of `head` (+ shift mm)."""
    from scripted_models.volume import Volume

    def centre(v):
        return (v.ijk_to_lps() @ np.array([*(np.array(v.shape[::-1]) - 1) / 2.0, 1.0]))[:3]

    grid = Volume(np.zeros(shape, np.uint8), spacing=spacing, direction=direction)
    origin = centre(head) - centre(grid) + np.asarray(shift)
    return Volume(grid.array, spacing, tuple(origin), direction)


def _segmentation_labels(seg_node, reference_node):
    """Canonical labels of an output segmentation on the reference grid (via the logic's own export)."""
    from PathoSynSlicerLib.logic import PathoSynSlicerLogic

    vol, _ = PathoSynSlicerLogic().maskFromNode(seg_node, reference_node)
    return vol.array


# --- bad input: clear one-line errors, scene unchanged -------------------------------------------------------------
def test_bad_inputs_raise_one_line_errors_and_leave_scene_unchanged(app, logic):
    from scripted_models.errors import InputError

    head, node = add_head(app)
    mask = make_ball_mask(head)
    seg = app.add_segmentation(mask.array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    empty_seg = app.add_segmentation(np.zeros(head.shape, np.uint8), head.ijk_to_ras(), {1: "lesion"})
    no_segments = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    empty_label = app.add_volume(np.zeros(head.shape, np.uint8), head.ijk_to_ras(), "empty", labelmap=True)
    far = head.ijk_to_ras().copy()
    far[:3, 3] += 500.0
    outside_label = app.add_volume(mask.array, far, "outside", labelmap=True)
    outside_seg = app.add_segmentation(mask.array, far, SUBREGION_SEGMENTS, node_name="outside seg")
    unknown_names = app.add_segmentation(mask.array, head.ijk_to_ras(), {1: "Segment_1", 2: "Segment_2"})
    rgb = app.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    rgb.SetAndObserveImageData(_rgb_image(head.shape))
    before = snapshot(app, [node, empty_label, outside_label])

    cases = [
        (lambda: logic.synthesize(None, seg, steps=STEPS), "no input volume"),
        (lambda: logic.synthesize({}, seg, steps=STEPS), "no input volume"),
        (lambda: logic.synthesize(node, None, steps=STEPS), "no lesion mask"),
        (lambda: logic.synthesize(node, empty_seg, steps=STEPS), "empty"),
        (lambda: logic.synthesize(node, no_segments, steps=STEPS), "empty"),
        (lambda: logic.synthesize(node, empty_label, steps=STEPS), "empty"),
        (lambda: logic.synthesize(node, outside_label, steps=STEPS), "outside"),
        (lambda: logic.synthesize(node, outside_seg, steps=STEPS), "outside"),
        (lambda: logic.synthesize(node, seg, modality="dwi", steps=STEPS), "unknown modality"),
        (lambda: logic.synthesize({"pd": node}, seg, steps=STEPS), "unknown modality"),
        (lambda: logic.synthesize(node, unknown_names, steps=STEPS), "cannot map segment"),
        (lambda: logic.synthesize(node, seg, samples=0, steps=STEPS), "samples"),
        (lambda: logic.pseudoHealthy(node, empty_seg), "empty"),
        (lambda: logic.synthesize({"t1": node, "flair": node}, seg, steps=STEPS), "selected for both t1 and flair"),
        (lambda: logic.synthesize(rgb, seg, steps=STEPS), "'photo' has 3 values per voxel"),
    ]
    for call, expected in cases:
        with pytest.raises(InputError) as info:
            call()
        message = str(info.value)
        assert expected in message, message
        assert "\n" not in message
        assert_unchanged(app, [node, empty_label, outside_label], before)


def _rgb_image(shape):
    from vtkmodules.vtkCommonDataModel import vtkImageData

    image = vtkImageData()
    image.SetDimensions(shape[2], shape[1], shape[0])
    image.AllocateScalars(3, 3)  # unsigned char, RGB
    return image


def test_missing_weights_raise_weights_error_scene_unchanged(app, logic, tmp_path, monkeypatch):
    from scripted_models.errors import WeightsError
    from scripted_models.pathosyn import api

    head, node = add_head(app)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    before = snapshot(app, [node])
    monkeypatch.setenv("PATHOSYN_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    monkeypatch.setattr(api, "_MODELS", {})
    with pytest.raises(WeightsError) as info:
        logic.synthesize(node, seg, steps=STEPS)
    assert "missing" in str(info.value) and "\n" not in str(info.value)
    assert_unchanged(app, [node], before)


def test_missing_dependencies_are_reported(monkeypatch):
    from PathoSynSlicerLib import logic as logic_module

    from scripted_models.errors import InputError

    real = logic_module.importlib.util.find_spec
    monkeypatch.setattr(logic_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "monai" else real(name, *a))
    assert logic_module.missingDependencies() == {"monai": "monai>=1.4"}
    with pytest.raises(InputError, match="missing Python packages: monai"):
        logic_module.checkDependencies()


def test_pseudo_healthy_creates_new_node(app, logic):
    head, node = add_head(app, direction=OBLIQUE)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    before = array_of(node)
    healthy = logic.pseudoHealthy(node, seg)
    assert healthy["t1"].GetName() == "head pseudo-healthy"
    assert np.array_equal(ijk_to_ras(healthy["t1"]), ijk_to_ras(node))
    assert np.array_equal(array_of(node), before)
    assert (array_of(healthy["t1"]) != before).any()


# --- parameters survive a scene save / reload -----------------------------------------------------------------------
def test_parameters_survive_mrb_save_and_reload(app, logic, tmp_path):
    from PathoSynSlicerLib import parameters

    head, node = add_head(app, direction=OBLIQUE)
    t2head = make_head(seed=5, direction=OBLIQUE)
    t2 = app.add_volume(t2head.array, t2head.ijk_to_ras(), "T2")
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    params = logic.getParameters()
    params.t1Volume, params.t2Volume, params.maskSegmentation = node, t2, seg
    params.seed, params.samples, params.steps, params.guidance, params.device = 42, 3, 17, 2.5, "cpu"
    params.preview = True
    from scripted_models.weights import load_card

    assert params.populationPull == load_card("deviation_diffusion")["population_pull"] == 0.75  # the card's default
    params.populationPull = 0.25
    assert params.keepBaseTexture is False
    params.keepBaseTexture = True
    assert parameters.inputVolumes(params) == {"t1": node, "t2": t2}
    assert parameters.effectiveSteps(params) == parameters.PREVIEW_STEPS

    path = app.save_mrb(tmp_path / "scene.mrb")
    assert path.stat().st_size > 1000
    app.scene.Clear(0)
    assert app.scene.GetFirstNodeByName("head") is None
    app.load_mrb(path)

    params = logic.getParameters()
    assert (params.seed, params.samples, params.steps, params.guidance, params.device) == (42, 3, 17, 2.5, "cpu")
    assert params.preview is True and params.t1cVolume is None and params.populationPull == 0.25
    assert params.keepBaseTexture is True
    reloaded = params.t1Volume
    assert reloaded is not None and reloaded.GetName() == "head"
    assert params.t2Volume.GetName() == "T2"
    assert params.maskSegmentation.GetSegmentation().GetNumberOfSegments() == 3
    assert np.allclose(ijk_to_ras(reloaded), head.ijk_to_ras(), atol=1e-6)
    assert np.array_equal(array_of(reloaded), head.array)
    # and the reloaded scene is usable as is
    out = logic.synthesize(parameters.inputVolumes(params), parameters.maskNode(params), steps=STEPS)
    assert set(out.volumes) == {"t1", "t2"}


# --- the background runner ------------------------------------------------------------------------------------------
def test_keep_base_texture_reaches_the_job_and_the_in_process_run(app, logic):
    from PathoSynSlicerLib.process import workerJob

    head, node = add_head(app)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    for keep in (False, True):
        job = logic.createJob(node, seg, seed=1, steps=2, keepBaseTexture=keep, writeInputs=False)
        try:
            assert ("--keep-base-texture" in job.argv) is keep
            assert workerJob(job.argv)[1]["keep_base_texture"] is keep
        finally:
            job.cleanup()
    kept, matched = (logic.synthesize(node, seg, seed=1, steps=2, device="cpu", keepBaseTexture=keep)
                     for keep in (True, False))
    assert kept.report["texture_match"] == {} and set(matched.report["texture_match"]) == {"t1"}
    assert not np.array_equal(array_of(kept.volumes["t1"]), array_of(matched.volumes["t1"]))


def test_brain_mask_node_reaches_the_job_and_the_in_process_run(app, logic):
    """A raw scan (noisy air, scalp, skull) with a brain mask (labelmap or one-segment segmentation): the job writes
    it and passes --brain-mask; the in-process run normalises over it (no raw-scan warning); the inputs stay as
    they were; a segmentation of several segments is refused in one line."""
    from conftest import noisy_head
    from PathoSynSlicerLib.process import workerJob

    from scripted_models.errors import InputError
    from scripted_models.volume import Volume, read_volume

    array, brain, _ = noisy_head()
    scan = Volume(array, (1.0, 1.0, 1.0))
    node = app.add_volume(array, scan.ijk_to_ras(), "raw head")
    seg = app.add_segmentation(make_ball_mask(scan, radius_vox=5).array, scan.ijk_to_ras(), SUBREGION_SEGMENTS)
    label = app.add_volume(brain.astype(np.uint8), scan.ijk_to_ras(), "brain", labelmap=True)
    brain_seg = app.add_segmentation(brain.astype(np.uint8), scan.ijk_to_ras(), {1: "Brain"})
    before = snapshot(app, [node, label])
    job = logic.createJob(node, seg, seed=1, steps=1, brainMaskNode=label)
    try:
        args = workerJob(job.argv)[1]
        assert "--brain-mask" in job.argv and np.array_equal(read_volume(args["brain_mask"]).array > 0, brain)
    finally:
        job.cleanup()
    for given in (label, brain_seg):
        out = logic.synthesize(node, seg, seed=1, steps=1, device="cpu", brainMaskNode=given)
        assert out.report["normalised_over"] == "brain mask" and not out.report["warnings"]
    with pytest.warns(UserWarning, match="background is noise"):
        raw = logic.synthesize(node, seg, seed=1, steps=1, device="cpu")
    assert "not skull-stripped" in raw.report["warnings"][0]
    two = app.add_segmentation(np.where(brain, 1, 0).astype(np.uint8) + (make_ball_mask(scan).array > 0),
                               scan.ijk_to_ras(), {1: "Brain", 2: "Other"})
    with pytest.raises(InputError, match="one segment"):
        logic.synthesize(node, seg, steps=1, brainMaskNode=two)
    arrays, _ = before
    assert all(np.array_equal(array_of(n), arrays[n.GetID()][0]) for n in (node, label))


def test_runner_progress_then_outputs_as_new_nodes(app, logic):
    from PathoSynSlicerLib.process import DONE

    head, node = add_head(app, direction=FLIPPED)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    job = logic.createJob(node, seg, seed=3, samples=2, steps=STEPS, threads=1)
    try:
        before_ids = app.node_ids()
        progress, done = [], []
        runner = engine_process(job.argv, onProgress=lambda f, m: progress.append((f, m)), onDone=done.append)
        runner.start()
        assert runner.running
        assert app.node_ids() == before_ids  # the background run does not touch the scene
        assert runner.wait(timeout=300) == DONE, runner.stderr
        assert runner.returnCode == 0 and done and done[0]["event"] == "done"
        fractions = [f for f, _ in progress]
        assert len(fractions) >= 3 and fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
        out = logic.loadJobOutputs(job)
        assert np.array_equal(ijk_to_ras(out.volumes["t1"]), ijk_to_ras(node))
        assert out.volumes["t1"].GetName() == "head synthesized" and out.uncertainty
        assert out.report["samples"] == 2 and out.report["seed"] == 3
        assert (array_of(out.volumes["t1"]) != head.array).any()
    finally:
        job.cleanup()
    assert not job.folder.exists()


def test_runner_cancel_leaves_scene_unchanged(app, logic):
    from PathoSynSlicerLib.process import CANCELLED

    head, node = add_head(app)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    before = snapshot(app, [node])
    job = logic.createJob(node, seg, samples=4, steps=200, threads=1)
    finished = []
    runner = engine_process(job.argv, onFinished=finished.append).start()
    t0 = time.monotonic()
    while runner.poll() and not runner.events and time.monotonic() - t0 < 120:
        time.sleep(0.05)  # cancel once the child has started working
    assert runner.running, runner.stderr
    runner.cancel()
    job.cleanup()
    assert runner.state == CANCELLED and finished == [CANCELLED]
    assert runner._proc.poll() is not None  # the process is gone
    assert not (job.outputDir / "report.json").exists()
    assert_unchanged(app, [node], before)


# --- the warm engine worker (what the module's buttons use) ----------------------------------------------------------
@pytest.fixture(scope="module")
def engine_worker():
    from scripted_models.worker import EngineWorker

    with EngineWorker(threads=1) as worker:
        yield worker


def _one_step_click(logic, node, seg, worker) -> str:
    from PathoSynSlicerLib.process import WorkerRunner

    job = logic.createJob(node, seg, steps=1)
    try:
        return WorkerRunner(job.argv, worker=worker).start().wait(timeout=300)
    finally:
        job.cleanup()


def _wait_started(runner, timeout=120):
    t0 = time.monotonic()
    while runner.poll(0.05) and not runner.events and time.monotonic() - t0 < timeout:
        pass
    assert runner.running, runner.error


def test_worker_runner_loads_outputs_and_stays_warm(app, logic, engine_worker):
    from PathoSynSlicerLib.process import DONE, WorkerRunner

    head, node = add_head(app, direction=FLIPPED)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    starts = engine_worker.starts
    names = []
    for seed in (3, 4):
        job = logic.createJob(node, seg, seed=seed, samples=2, steps=STEPS)
        try:
            done = []
            runner = WorkerRunner(job.argv, worker=engine_worker, onDone=done.append).start()
            assert runner.wait(timeout=300) == DONE, runner.error
            assert done and done[0]["event"] == "done"
            out = logic.loadJobOutputs(job)
        finally:
            job.cleanup()
        assert np.array_equal(ijk_to_ras(out.volumes["t1"]), ijk_to_ras(node)) and out.uncertainty
        assert out.report["seed"] == seed and (array_of(out.volumes["t1"]) != head.array).any()
        names.append(out.volumes["t1"].GetName())
    assert engine_worker.starts == starts  # the second click reused the loaded models
    assert names == ["head synthesized", "head synthesized_1"]


def test_worker_runner_cancel_keeps_the_worker_and_the_scene(app, logic, engine_worker):
    from PathoSynSlicerLib.process import CANCELLED, DONE, WorkerRunner

    head, node = add_head(app)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    before = snapshot(app, [node])
    pid = engine_worker.proc.pid if engine_worker.alive else None
    job = logic.createJob(node, seg, samples=4, steps=200)
    finished = []
    runner = WorkerRunner(job.argv, worker=engine_worker, onFinished=finished.append).start()
    _wait_started(runner)
    runner.cancel()
    job.cleanup()
    assert runner.state == CANCELLED and finished == [CANCELLED]
    assert engine_worker.alive and (pid is None or engine_worker.proc.pid == pid)  # the models stay loaded
    assert_unchanged(app, [node], before)
    assert _one_step_click(logic, node, seg, engine_worker) == DONE


def test_a_dead_worker_fails_the_click_with_a_reason_and_the_next_click_works(app, logic):
    import signal

    from PathoSynSlicerLib.process import DONE, FAILED, WorkerRunner

    from scripted_models.worker import EngineWorker

    head, node = add_head(app)
    seg = app.add_segmentation(make_ball_mask(head).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    before = snapshot(app, [node])
    with EngineWorker(threads=1) as worker:
        job = logic.createJob(node, seg, steps=400)
        errors = []
        runner = WorkerRunner(job.argv, worker=worker, onError=errors.append).start()
        _wait_started(runner)
        os.kill(worker.proc.pid, signal.SIGKILL)
        assert runner.wait(timeout=60) == FAILED
        job.cleanup()
        assert errors == [runner.error] and "engine worker stopped" in runner.error and "\n" not in runner.error
        assert_unchanged(app, [node], before)
        assert _one_step_click(logic, node, seg, worker) == DONE
        assert worker.starts == 2


def test_scans_on_different_grids_give_outputs_on_their_own_grids(app, logic, engine_worker):
    """A 1 mm t1 and a 3 mm-slice flair of one subject (an oblique pair, as from two DICOM series), in process and
    through the worker's cropped job outputs: each output node on its input's grid, the flair's voxels unchanged
    away from the lesion, the lesion segmentation on the finer t1 grid; the same values both ways."""
    from PathoSynSlicerLib.process import DONE, WorkerRunner

    from scripted_models.evaluation.bench import thick_slices

    t1 = make_head(shape=(48, 56, 52), spacing=(1.0, 1.0, 1.0), direction=FLIPPED)
    thick = thick_slices(make_head(shape=(48, 56, 52), spacing=(1.0, 1.0, 1.0), direction=FLIPPED, seed=1))
    flairNode = app.add_volume(thick.array, thick.ijk_to_ras(), "flair 3 mm")
    t1Node = app.add_volume(t1.array, t1.ijk_to_ras(), "t1 1 mm")
    ball = make_ball_mask(t1).array
    seg = app.add_segmentation(ball, t1.ijk_to_ras(), SUBREGION_SEGMENTS)
    volumes = {"flair": flairNode, "t1": t1Node}
    direct = logic.synthesize(volumes, seg, seed=2, steps=2)
    job = logic.createJob(volumes, seg, seed=2, steps=2)
    try:
        assert WorkerRunner(job.argv, worker=engine_worker).start().wait(timeout=300) == DONE
        assert "outputs_box_zyx_by_modality" in json.loads((job.outputDir / "report.json").read_text())
        viaJob = logic.loadJobOutputs(job)
    finally:
        job.cleanup()
    for out in (direct, viaJob):
        for mod, node in volumes.items():
            assert np.array_equal(ijk_to_ras(out.volumes[mod]), ijk_to_ras(node))
            assert np.array_equal(ijk_to_ras(out.residuals[mod]), ijk_to_ras(node))
        flair, residual = array_of(out.volumes["flair"]), array_of(out.residuals["flair"])
        assert flair.shape == thick.shape and (flair != thick.array).any()
        assert np.array_equal(flair[residual == 0], thick.array[residual == 0])
        labels = logic.maskFromNode(out.segmentation, t1Node)[0].array
        assert np.array_equal(labels > 0, ball > 0)  # exported on the t1's 1 mm grid, not the flair's 3 mm slices
    assert np.array_equal(array_of(direct.volumes["flair"]), array_of(viaJob.volumes["flair"]))
    assert np.array_equal(array_of(direct.volumes["t1"]), array_of(viaJob.volumes["t1"]))


def test_runner_surfaces_exit_code_2_errors(tmp_path):
    from PathoSynSlicerLib.process import FAILED

    from scripted_models.volume import write_volume

    head = make_head()
    write_volume(head, tmp_path / "t1.nii.gz")
    write_volume(head.with_array(np.zeros(head.shape, np.uint8)), tmp_path / "mask.nii.gz")
    errors = []
    runner = engine_process(["synthesize", "--image", f"t1={tmp_path / 't1.nii.gz'}",
                             "--mask", str(tmp_path / "mask.nii.gz"), "--out", str(tmp_path / "out"), "--steps", "2"],
                            onError=errors.append).start()
    assert runner.wait(timeout=600) == FAILED
    assert runner.returnCode == 2
    assert errors == [runner.error] and "empty" in runner.error and "\n" not in runner.error
    assert not (tmp_path / "out" / "report.json").exists()

    bad = engine_process(["synthesize", "--image", "dwi=x.nii.gz", "--mask", "m.nii.gz", "--out", str(tmp_path / "o")])
    assert bad.start().wait(timeout=600) == FAILED and bad.returnCode == 2 and "unknown modality" in bad.error


# --- sample data ------------------------------------------------------------------------------------------------------
def test_sample_data_loads_with_checksums(app, logic, tmp_path, monkeypatch):
    pytest.importorskip("nilearn")
    monkeypatch.setenv("PATHOSYN_CACHE", str(tmp_path))
    files = logic.sampleDataFiles()
    assert files["t1"].parent == tmp_path and files["t1"].is_file()
    t1, seg = logic.loadSampleData()
    assert t1.GetName() == "MNI152 T1" and seg.GetSegmentation().GetNumberOfSegments() == 3
    assert tuple(reversed(t1.GetImageData().GetDimensions())) == (189, 233, 197)


# --- offscreen render of the result through MRML displayable managers ------------------------------------------------
def test_offscreen_render_of_result_is_not_blank(app, logic, tmp_path):
    """Slice views (input | synthesized + lesion segmentation) and a 3D view of the segmentation, rendered by the
    MRML displayable managers offscreen (EGL/Mesa)."""
    head, node = add_head(app, spacing=(1.0, 1.0, 1.0))
    seg = app.add_segmentation(make_ball_mask(head, radius_vox=9).array, head.ijk_to_ras(), SUBREGION_SEGMENTS)
    seg.GetDisplayNode().SetVisibility(False)
    out = logic.synthesize(node, seg, steps=STEPS)
    lesion_ras = (ijk_to_ras(node) @ np.array([*(np.array(head.shape[::-1]) - 1) / 2.0, 1.0]))[:3]
    size = (320, 320)
    display = out.segmentation.GetDisplayNode()

    display.SetVisibility(False)
    before = app.render_slice(node, size=size, name="Red", offset_ras=lesion_ras)
    after = app.render_slice(out.volumes["t1"], size=size, name="Yellow", offset_ras=lesion_ras)
    empty_3d = app.render_3d(size=size, name="View1")
    display.SetVisibility(True)
    overlay = app.render_slice(out.volumes["t1"], segmentation=out.segmentation, size=size, name="Green",
                               offset_ras=lesion_ras)
    three_d = app.render_3d(size=size, name="View2")

    for img in (before, after, overlay, three_d):
        assert img.shape == (*size, 3) and img.dtype == np.uint8
    nonblank = {name: float((img.max(axis=2) > 10).mean()) for name, img in
                (("input", before), ("synthesized", after), ("overlay", overlay))}
    assert min(nonblank.values()) > 0.2, nonblank  # the head fills a good part of the view
    assert (before != after).any(axis=2).mean() > 0.001  # the synthesized lesion is visible in the slice
    assert (overlay != after).any(axis=2).mean() > 0.005  # the segmentation fill is drawn on top
    surface = (three_d.astype(int) - empty_3d).__abs__().max(axis=2) > 20
    assert surface.mean() > 0.01, surface.mean()  # the 3D lesion surface covers part of the view
    panel = np.concatenate([before, overlay, three_d], axis=1)
    path = save_png(panel, tmp_path / "pathosyn_render.png")
    assert path.stat().st_size > 5000


@pytest.mark.skipif(os.environ.get("PATHOSYN_WRITE_SCREENSHOT") != "1",
                    reason="set PATHOSYN_WRITE_SCREENSHOT=1 to regenerate Resources/Screenshots/pathosyn.png")
def test_write_extension_screenshot_mni(app, logic):
    """The extension screenshot: the teaching sample (MNI152 T1 + demo lesion) before | after + lesion | 3D."""
    pytest.importorskip("nilearn")
    t1, seg = logic.loadSampleData()
    steps = int(os.environ.get("PATHOSYN_SCREENSHOT_STEPS", "10"))
    out = logic.synthesize(t1, seg, seed=0, steps=steps)
    seg.GetDisplayNode().SetVisibility(False)
    segmentation = out.segmentation.GetSegmentation()
    centre = out.segmentation.GetSegmentCenterRAS(segmentation.GetNthSegmentID(0))
    size = (300, 300)
    display = out.segmentation.GetDisplayNode()
    display.SetVisibility(False)
    before = app.render_slice(t1, size=size, name="Red", offset_ras=centre)
    after = app.render_slice(out.volumes["t1"], size=size, name="Yellow", offset_ras=centre)
    display.SetVisibility(True)
    display.SetOpacity2DFill(0.25)
    overlay = app.render_slice(out.volumes["t1"], segmentation=out.segmentation, size=size, name="Green",
                               offset_ras=centre)
    three_d = app.render_3d(size=size)
    assert (before != after).any(axis=2).mean() > 0.001
    save_png(np.concatenate([before, after, overlay, three_d], axis=1), SCREENSHOT)


def test_screenshot_file_is_committed_and_not_blank():
    from PIL import Image

    assert SCREENSHOT.is_file(), f"{SCREENSHOT} missing: run the render test"
    img = np.asarray(Image.open(SCREENSHOT).convert("RGB"))
    assert img.shape[0] >= 300 and img.shape[1] >= 900
    assert (img.max(axis=2) > 10).mean() > 0.05


def test_engine_found_relative_to_module_file():
    from PathoSynSlicerLib import logic as logic_module

    assert Path(logic_module.ENGINE_ROOT, "scripted_models", "__init__.py").is_file()
    assert logic_module.SAMPLE_LESION_FILE.is_file()


def test_console_batch_runs_a_manifest_resumes_and_loads_results(app, logic, tmp_path):
    """PathoSynSlicerLogic.batch: the `pathosyn batch` engine from the Slicer console, results loaded as nodes."""
    import slicer
    from test_batch import make_cohort

    from scripted_models.errors import InputError
    from scripted_models.volume import read_volume

    manifest = make_cohort(tmp_path / "cohort", 2)
    result = logic.batch(manifest, tmp_path / "out", loadResults=True)
    assert [r["status"] for r in result.rows] == ["done", "done"]
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    for case_id, nodes in result.nodes.items():
        assert {"t1", "residual_t1", "mask"} <= set(nodes)
        assert nodes["mask"].IsA("vtkMRMLSegmentationNode") and nodes["mask"].GetSegmentation().GetNumberOfSegments()
        folders = {sh.GetItemParent(sh.GetItemByDataNode(n)) for n in nodes.values()}
        assert len(folders) == 1 and sh.GetItemName(folders.pop()) == case_id
        row = next(r for r in result.rows if r["case_id"] == case_id)
        on_disk = read_volume(row["files"]["t1"])
        assert np.array_equal(array_of(nodes["t1"]), on_disk.array)
    assert "flair" in result.nodes["case1"]
    before = app.node_ids()
    again = logic.batch(manifest, tmp_path / "out")  # resume is the default: nothing is redone or loaded
    assert [r["status"] for r in again.rows] == ["skipped", "skipped"] and app.node_ids() == before
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,mask,seed,t1\nx,missing.nii.gz,0,missing.nii.gz\n")
    with pytest.raises(InputError, match="line 2"):
        logic.batch(bad, tmp_path / "out2")
    assert app.node_ids() == before
