"""The PathoSyn / PathAR side panel (vuetify3 widgets bound to PathoSynWebState). Only layout: every handler is a
controller method passed in by app.py. Element ids (`ps-...`) are what the browser test and the bench click."""
from __future__ import annotations

from trame.widgets import html
from trame.widgets.vuetify3 import (
    VAlert,
    VBtn,
    VBtnToggle,
    VCard,
    VCardText,
    VCardTitle,
    VCheckbox,
    VCol,
    VDivider,
    VProgressLinear,
    VRow,
    VSelect,
    VSlider,
    VTextField,
)

from .state import ANATOMY_ITEMS, MODALITY_ITEMS, OVERLAY_ITEMS


def _section(title: str):
    card = VCard(variant="flat", classes="mb-1")
    with card:
        VCardTitle(title, classes="text-subtitle-1 py-1")
    return card


class PathoSynPanel(html.Div):
    def __init__(self, name, handlers: dict, **kwargs):
        super().__init__(classes="pa-2", style="overflow-y: auto; height: 100%;", **kwargs)
        n = name  # TypedState names of PathoSynWebState
        busy = f"{n.running}"
        with self:
            VAlert(v_if=(n.error,), text=(n.error,), type="error", density="compact", closable=True,
                   id="ps-error", classes="mb-2", click_close=f"{n.error} = ''")
            with _section("1. Scan"), VCardText(classes="py-1"):
                VBtn("Load teaching sample", id="ps-load-sample", block=True, variant="tonal",
                     prepend_icon="mdi-school", click=handlers["load_sample"], disabled=(busy,))
                html.Div("or a NIfTI / NRRD file or a DICOM series folder (one per modality; upload: the file "
                         "button in the top bar)", classes="text-caption mt-2")
                with VRow(dense=True, classes="mt-0"):
                    with VCol(cols=8):
                        VTextField(v_model=(n.scan_path,), label="scan path on the server", density="compact",
                                   hide_details=True, id="ps-scan-path")
                    with VCol(cols=4):
                        VSelect(v_model=(n.scan_modality,), items=("modalities", MODALITY_ITEMS), density="compact",
                                hide_details=True, label="modality")
                VBtn("Load scan", id="ps-load-scan", size="small", variant="tonal", classes="mt-1",
                     click=(handlers["load_scan"], f"[{n.scan_path}, {n.scan_modality}]"), disabled=(busy,))
                with html.Div(v_for=f"scan in {n.scans}", key="scan.node_id", classes="d-flex align-center mt-1"):
                    html.Span("{{ scan.name }}", classes="text-body-2 flex-grow-1")
                    VSelect(model_value=("scan.modality",), items=("modalities", MODALITY_ITEMS), density="compact",
                            hide_details=True, style="max-width: 110px;",
                            update_modelValue=(handlers["set_modality"], "[scan.node_id, $event]"))
            with _section("2. Lesion mask"), VCardText(classes="py-1"):
                html.Div("{{ " + f"{n.segmentation_name} || 'no mask yet'" + " }}", classes="text-body-2 mb-1",
                         id="ps-segmentation-name")
                with html.Div(classes="d-flex ga-1"):
                    VBtn("core / edema / enhancing", id="ps-new-subregions", size="small", variant="tonal",
                         click=handlers["new_subregions"], disabled=(busy,))
                    VBtn("whole lesion", id="ps-new-whole", size="small", variant="tonal",
                         click=handlers["new_whole"], disabled=(busy,))
                html.Div("Paint, Erase, Scissors, Undo: the left toolbar (brush panel for more)",
                         classes="text-caption mt-1")
                with VRow(dense=True, classes="mt-0"):
                    with VCol(cols=8):
                        VTextField(v_model=(n.mask_path,), label="mask file on the server", density="compact",
                                   hide_details=True, id="ps-mask-path")
                    with VCol(cols=4):
                        VBtn("Load", id="ps-load-mask", size="small", variant="tonal", disabled=(busy,),
                             click=(handlers["load_mask"], f"[{n.mask_path}]"))
                with VRow(dense=True, classes="mt-0"):
                    with VCol(cols=8):
                        VTextField(v_model=(n.brain_mask_path,), density="compact", hide_details=True,
                                   label="brain mask file (optional: scans with scalp and skull)",
                                   id="ps-brain-mask-path")
                    with VCol(cols=4):
                        VBtn("Load", id="ps-load-brain-mask", size="small", variant="tonal", disabled=(busy,),
                             click=(handlers["load_brain_mask"], f"[{n.brain_mask_path}]"))
                html.Div("{{ " + f"{n.brain_mask_name} ? 'brain mask: ' + {n.brain_mask_name} : ''" + " }}",
                         classes="text-caption", id="ps-brain-mask-name")
            with _section("3. Synthesize"), VCardText(classes="py-1"):
                with VRow(dense=True):
                    with VCol(cols=4):
                        VTextField(v_model_number=(n.seed,), type="number", label="seed", density="compact",
                                   hide_details=True, id="ps-seed")
                    with VCol(cols=4):
                        VTextField(v_model_number=(n.samples,), type="number", label="samples", density="compact",
                                   hide_details=True, id="ps-samples")
                    with VCol(cols=4):
                        VTextField(v_model_number=(n.steps,), type="number", label="steps", density="compact",
                                   hide_details=True, id="ps-steps", disabled=(n.preview,))
                with VRow(dense=True):
                    with VCol(cols=5):
                        VCheckbox(v_model=(n.preview,), label="preview (2)", density="compact", hide_details=True)
                    with VCol(cols=7):
                        VSlider(v_model=(n.guidance,), min=0, max=3, step=0.1, label="guidance", density="compact",
                                hide_details=True, thumb_label=True)
                with VRow(dense=True):
                    with VCol(cols=12):
                        VSlider(v_model=(n.population_pull,), min=0, max=1, step=0.1, label="population pull",
                                density="compact", hide_details=True, thumb_label=True, id="ps-population-pull",
                                title="how far lesion levels move towards the training lesions' typical level")
                with VRow(dense=True):
                    with VCol(cols=12):
                        VCheckbox(v_model=(n.keep_base_texture,), label="keep healthy texture in the lesion",
                                  density="compact", hide_details=True, id="ps-keep-texture",
                                  title="off: the lesion gets the fine texture real lesions have in each sequence")
                with html.Div(classes="d-flex ga-1 mt-1"):
                    VBtn("Synthesize lesion", id="ps-synthesize", color="primary", click=handlers["synthesize"],
                         disabled=(busy,))
                    VBtn("Pseudo-healthy", id="ps-pseudo-healthy", variant="tonal", click=handlers["pseudo_healthy"],
                         disabled=(busy,))
                VProgressLinear(v_if=(busy,), model_value=(n.progress,), height=8, color="primary", classes="mt-2",
                                id="ps-progress")
                VBtn("Cancel", v_if=(busy,), id="ps-cancel", size="small", color="error", variant="tonal",
                     classes="mt-1", click=handlers["cancel"])
                html.Div("{{ " + f"{n.message}" + " }}", classes="text-caption mt-1", id="ps-message")
                VSelect(v_if=(n.has_result,), v_model=(n.overlay,), items=("overlays", OVERLAY_ITEMS),
                        label="overlay on the result", density="compact", hide_details=True, classes="mt-2",
                        id="ps-overlay")
            with _section("4. PathAR samples"), VCardText(classes="py-1"):
                VSelect(v_model=(n.pathar_modalities,), items=("modalities", MODALITY_ITEMS), multiple=True,
                        chips=True, label="modalities", density="compact", hide_details=True)
                with VRow(dense=True, classes="mt-1"):
                    with VCol(cols=4):
                        VTextField(v_model_number=(n.pathar_n,), type="number", label="samples (1-4)",
                                   density="compact", hide_details=True, id="ps-pathar-n")
                    with VCol(cols=4):
                        VTextField(v_model_number=(n.pathar_seed,), type="number", label="seed", density="compact",
                                   hide_details=True)
                    with VCol(cols=4):
                        VTextField(v_model_number=(n.pathar_temperature,), type="number", step="0.1",
                                   label="temperature", density="compact", hide_details=True)
                VSelect(v_model=(n.pathar_anatomy,), items=("anatomy_items", ANATOMY_ITEMS), label="anatomy",
                        density="compact", hide_details=True, classes="mt-1", id="ps-pathar-anatomy")
                VBtn("Generate samples", id="ps-pathar-generate", variant="tonal", classes="mt-1",
                     click=handlers["pathar"], disabled=(busy,))
                with html.Div(v_if=(n.pathar_has_run,), classes="mt-2"):
                    VSelect(v_model=(n.pathar_modality,), items=(n.pathar_modalities,), label="show modality",
                            density="compact", hide_details=True, id="ps-pathar-modality")
                    with html.Div(classes="d-flex ga-1 align-center mt-1"):
                        VTextField(v_model_number=(n.pathar_sample,), type="number", label="sample",
                                   density="compact", hide_details=True, style="max-width: 90px;",
                                   id="ps-pathar-sample")
                        VBtn("Use this mask", id="ps-use-mask", size="small", variant="tonal",
                             click=handlers["use_mask"], disabled=(busy,))
                    VCheckbox(v_model=(n.pathar_add,), label="add to the current mask", density="compact",
                              hide_details=True, id="ps-pathar-add")
                    html.Div(v_if=(n.placing,), children=["click a point in the axial view"],
                             classes="text-caption text-warning")
            with _section("5. Save"), VCardText(classes="py-1"):
                VTextField(v_model=(n.save_folder,), label="folder on the server", density="compact",
                           hide_details=True, id="ps-save-folder")
                VCheckbox(v_model=(n.save_mrb,), label="also the scene (.mrb)", density="compact", hide_details=True)
                VBtn("Save results", id="ps-save", size="small", variant="tonal",
                     click=(handlers["save"], f"[{n.save_folder}, {n.save_mrb}]"),
                     disabled=(f"{busy} || !{n.has_result}",))
            VDivider()


class LayoutToggle(VBtnToggle):
    """Paint / Compare / PathAR switch in the top bar."""

    def __init__(self, name, **kwargs):
        super().__init__(v_model=(name.layout,), mandatory=True, density="compact", variant="outlined",
                         divided=True, **kwargs)
        with self:
            VBtn("Paint", value="Paint", id="ps-layout-paint")
            VBtn("Compare", value="Compare", id="ps-layout-compare")
            VBtn("PathAR", value="PathAR", id="ps-layout-pathar")
