"""Device, precision and thread choices shared by inference and training."""
from __future__ import annotations

import contextlib
import os

import torch

from .errors import InputError


def pick_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown device '{name}': expected auto, cpu or cuda")
    return torch.device(name)


def available_devices() -> list[str]:
    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bf16_supported(device: torch.device) -> bool:
    if os.environ.get("PATHOSYN_NO_BF16"):
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return native_cpu_bf16()


def native_cpu_bf16() -> bool:
    """True only with bf16 instructions (AVX512-BF16 or AMX). oneDNN also reports bf16 on plain AVX-512,
    where it is emulated and measured 3x slower than float32 for a 3D U-Net training step."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001 - older builds lack these probes
        return False


def autocast(device: torch.device):
    """bf16 autocast where the hardware supports it (1.7-4x faster on this CPU), else a no-op."""
    if bf16_supported(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_autocast(device: torch.device):
    """Precision for training steps: bf16 autocast on CUDA (where supported), float32 on the CPU unless
    PATHOSYN_TRAIN_BF16=1. Measured on this project's CPU host (AMX bf16): the PathAR structure VQ trained under
    CPU bf16 autocast did not learn (loss 1.24 after 175 steps, codebook collapsed to 19 codes, whole-lesion
    Dice 0.58) where float32 reached loss 0.80 by step 150; inference (`autocast`) stays bf16."""
    return autocast(device) if trains_in_bf16(device) else contextlib.nullcontext()


def trains_in_bf16(device: torch.device) -> bool:
    """Whether `training_autocast` uses bf16 on `device` (cards record it)."""
    return (device.type == "cuda" or bool(os.environ.get("PATHOSYN_TRAIN_BF16"))) and bf16_supported(device)


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))


def _onednn_conv_forward(conv: torch.nn.modules.conv._ConvNd, original):
    """Forward for one Conv2d/Conv3d: oneDNN for CPU inference, the module's own path otherwise."""

    def conv_forward(input, weight, bias):
        if input.device.type != "cpu" or torch.is_grad_enabled():
            return original(input, weight, bias)
        return torch.mkldnn_convolution(input.contiguous(), weight.contiguous(), bias, conv.padding, conv.stride,
                                        conv.dilation, conv.groups)

    return conv_forward


def pin_onednn_convolutions(net: torch.nn.Module) -> torch.nn.Module:
    """Run every Conv2d/Conv3d of `net` through oneDNN at CPU inference.

    PyTorch otherwise picks the convolution backend per call from the tensor size and the thread count (1x1
    kernels on one thread use its own kernel), so outputs changed in the last bits with torch.set_num_threads.
    With oneDNN alone the same seed gives the same bytes on 1 or 2 threads (and the deviation U-Net step measured
    about 8% faster). Training (grad enabled) and CUDA are untouched, and so are convolutions oneDNN cannot take
    as they are (non-zero padding modes, "same"/"valid" padding strings)."""
    if not torch.backends.mkldnn.is_available():
        return net
    for module in net.modules():
        if (isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and "_conv_forward" not in module.__dict__
                and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
            module._conv_forward = _onednn_conv_forward(module, module._conv_forward)
    return net
