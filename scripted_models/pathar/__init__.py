"""PathAR: dual-VQ tokenizer + interleaved autoregressive transformer with asymmetric attention."""
from ..labels import MODALITIES

# sample_pairs(anatomy_from=...): the weights' card decides, each modality draws its own anatomy, or the modality
# whose head and brain every modality shares (torch-free, for the Slicer and web front ends)
ANATOMY_CARD, ANATOMY_INDEPENDENT = "card", "none"
ANATOMY_CHOICES = (ANATOMY_CARD, ANATOMY_INDEPENDENT, *MODALITIES)
HEAD_MARGIN_Z = 0.5  # a voxel is head (not the constant outside-head background) above background_z + this
