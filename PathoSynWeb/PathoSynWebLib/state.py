"""The page's state: plain dataclasses, bound to trame through TypedState (names are prefixed by the dataclass)."""
from __future__ import annotations

from dataclasses import dataclass, field

from scripted_models.pathar import ANATOMY_CHOICES
from scripted_models.pathosyn.calibration import DEFAULT_POPULATION_PULL

MODALITY_ITEMS = ["t1", "t1c", "t2", "flair"]
OVERLAY_ITEMS = ["none", "residual", "uncertainty"]
ANATOMY_ITEMS = list(ANATOMY_CHOICES)  # PathAR: the weights' default, each modality its own anatomy, or one shared


@dataclass
class PathoSynWebState:
    # inputs
    scans: list = field(default_factory=list)  # [{"node_id", "name", "modality"}] (trame state is JSON)
    scan_path: str = ""  # on the server's disk: a NIfTI / NRRD file or a DICOM series folder
    scan_modality: str = "t1"
    mask_path: str = ""
    segmentation_name: str = ""
    brain_mask_path: str = ""  # optional, for scans with scalp and skull
    brain_mask_name: str = ""
    # synthesis parameters
    seed: int = 0
    samples: int = 1
    steps: int = 5
    preview: bool = False  # 2 steps
    guidance: float = 1.0
    population_pull: float = DEFAULT_POPULATION_PULL  # 0 = sampled levels, 1 = the training population's
    keep_base_texture: bool = False  # True: the healthy fine texture stays inside the lesion
    # job
    running: bool = False
    job_kind: str = ""  # synthesize | pseudo-healthy | sample
    progress: float = 0.0  # 0..100
    message: str = ""
    error: str = ""
    # results
    has_result: bool = False
    overlay: str = "none"
    layout: str = "Paint"
    # PathAR
    pathar_modalities: list = field(default_factory=lambda: ["t1c", "flair"])
    pathar_n: int = 2
    pathar_columns: int = 2  # samples the PathAR layout shows (its run's)
    pathar_seed: int = 0
    pathar_temperature: float = 1.0
    pathar_anatomy: str = "card"
    pathar_modality: str = "t1c"
    pathar_has_run: bool = False
    pathar_sample: int = 1  # 1-based, for "Use this mask"
    pathar_add: bool = False  # "Use this mask" keeps the current mask's lesions and adds the sample's
    placing: bool = False  # the next click in the input view places the sample's mask
    # save
    save_folder: str = ""
    save_mrb: bool = False


__all__ = ["ANATOMY_ITEMS", "MODALITY_ITEMS", "OVERLAY_ITEMS", "PathoSynWebState"]
