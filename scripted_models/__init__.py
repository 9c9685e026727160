"""PathoSyn engine: pure Python + PyTorch/MONAI, never imports Slicer, Qt or VTK.

    from scripted_models import synthesize_lesion, pseudo_healthy, sample_pairs
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Volume", "pseudo_healthy", "read_volume", "sample_pairs", "synthesize_lesion", "write_volume"]


def __getattr__(name):  # lazy: importing the package stays cheap (no torch until needed)
    if name in ("synthesize_lesion", "pseudo_healthy", "SynthesisResult"):
        from .pathosyn import api

        return getattr(api, name)
    if name == "sample_pairs":
        from .pathar.api import sample_pairs

        return sample_pairs
    if name in ("Volume", "read_volume", "write_volume"):
        from . import volume

        return getattr(volume, name)
    raise AttributeError(name)
