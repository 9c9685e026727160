"""Device, precision and thread choices shared by inference and training."""
from __future__ import annotations

import contextlib
import functools
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


CHANNELS_LAST = torch.channels_last_3d


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 (Slicer may bring torch 2.2): no device argument
        return torch.is_autocast_cpu_enabled()


def _cpu_autocast_dtype() -> torch.dtype:
    try:
        return torch.get_autocast_dtype("cpu")
    except (AttributeError, TypeError):  # torch < 2.4
        return torch.get_autocast_cpu_dtype()


@functools.cache
def _onednn_supports(dtype: torch.dtype) -> bool:
    """Whether torch.mkldnn_convolution takes `dtype` on this CPU (bf16 needs AVX512BW/VL/DQ or AVX-NE-CONVERT;
    other autocast dtypes take PyTorch's own path)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def _float32_inference(input: torch.Tensor) -> bool:
    return (input.device.type == "cpu" and not torch.is_grad_enabled() and input.dtype == torch.float32
            and not _cpu_autocast_enabled())


def _onednn_conv_forward(conv: torch.nn.modules.conv._ConvNd, original, channels_last: bool):
    """Forward for one Conv2d/Conv3d: oneDNN for CPU inference, the module's own path otherwise. With
    channels_last, 3-D convolutions in float32 run NDHWC (oneDNN's fast layout on CPUs without bf16)."""
    channels_last = channels_last and isinstance(conv, torch.nn.Conv3d)

    def conv_forward(input, weight, bias):
        if input.device.type != "cpu" or torch.is_grad_enabled():
            return original(input, weight, bias)
        layout = CHANNELS_LAST if channels_last and _float32_inference(input) else torch.contiguous_format
        if _cpu_autocast_enabled():  # as autocast's own conv: inputs, weight and bias in its dtype (bf16)
            dtype = _cpu_autocast_dtype()
            if not _onednn_supports(dtype):  # e.g. bf16 on AVX2 only: oneDNN refuses, PyTorch's own path runs it
                return original(input, weight, bias)
            input, weight = input.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return torch.mkldnn_convolution(input.contiguous(memory_format=layout),
                                        weight.contiguous(memory_format=layout), bias, conv.padding, conv.stride,
                                        conv.dilation, conv.groups)

    return conv_forward


def group_norm_channels_last(x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of a channels-last (N, C, D, H, W) tensor whose statistics are summed in a fixed order.

    PyTorch's channels-last GroupNorm kernel splits its sums between threads, so its bytes change with
    torch.set_num_threads. Here every channel is summed over each slice (the first spatial axis) in float32 (each
    slice sum is one output of the reduction, summed by one thread) and the slices in float64."""
    n, c, depth = x.shape[:3]
    groups, per_group = norm.num_groups, c // norm.num_groups
    voxels = x[0, 0].numel()
    by_slice = x.permute(0, 2, 3, 4, 1).reshape(n, depth, voxels // depth, c)  # a view of channels-last memory
    sums = by_slice.sum(2).double().sum(1).view(n, groups, per_group).sum(2)  # (N, G)
    squares = (by_slice * by_slice).sum(2).double().sum(1).view(n, groups, per_group).sum(2)
    count = voxels * per_group
    mean = sums / count
    inv_std = ((squares / count - mean * mean).clamp_min(0) + norm.eps).rsqrt()
    weight = norm.weight.double() if norm.affine else torch.ones(c, dtype=torch.float64)
    bias = norm.bias.double() if norm.affine else torch.zeros(c, dtype=torch.float64)
    scale = (weight.view(groups, per_group) * inv_std.view(n, groups, 1)).view(n, c)
    shift = bias - mean.repeat_interleave(per_group, 1) * scale
    return torch.addcmul(shift.float().view(n, c, 1, 1, 1), x, scale.float().view(n, c, 1, 1, 1))


def _group_norm_forward(norm: torch.nn.GroupNorm, original):
    def forward(x):
        if (x.dim() == 5 and _float32_inference(x) and x.is_contiguous(memory_format=CHANNELS_LAST)
                and not x.is_contiguous()):
            return group_norm_channels_last(x, norm)
        return original(x)

    return forward


# Nearest x2 upsampling followed by a 3-tap convolution equals a stride-2 transposed convolution with 4 taps,
# [w2, w1 + w2, w0 + w1, w0] per axis: the same sums on the low-resolution grid, 27/8 fewer multiplications.
_UPSAMPLE_TAPS = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float64)


def upsample_conv_as_transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3, 3) convolution weight -> (in, out, 4, 4, 4) weight of the equivalent transposed
    convolution (stride 2, padding 1) applied to the grid before nearest x2 upsampling."""
    taps = _UPSAMPLE_TAPS.to(weight.device)
    return torch.einsum("az,by,cx,oizyx->ioabc", taps, taps, taps, weight.double()).to(weight.dtype)


def _upsample_conv(module: torch.nn.Module) -> torch.nn.Conv3d | None:
    """The Conv3d of a MONAI nearest-upsample block (`upsample_non_trainable` x2, then `postconv` 3x3x3,
    stride 1, padding 1), or None for anything else."""
    children = dict(module.named_children())
    if list(children) != ["upsample_non_trainable", "postconv"]:
        return None
    upsample, postconv = children.values()
    conv = getattr(postconv, "conv", None)
    if not (isinstance(upsample, torch.nn.Upsample) and upsample.mode == "nearest" and upsample.size is None):
        return None
    scales = upsample.scale_factor if isinstance(upsample.scale_factor, tuple) else (upsample.scale_factor,) * 3
    if len(scales) != 3 or any(float(f) != 2.0 for f in scales):
        return None
    if (list(dict(postconv.named_children())) == ["conv"] and isinstance(conv, torch.nn.Conv3d)
            and conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1) and conv.padding == (1, 1, 1)
            and conv.dilation == (1, 1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"):
        return conv
    return None


def _upsample_conv_forward(conv: torch.nn.Conv3d, original):
    def forward(x, *args, **kwargs):
        if x.dim() == 5 and _float32_inference(x):
            weight = upsample_conv_as_transposed_weight(conv.weight).contiguous(memory_format=CHANNELS_LAST)
            return torch.nn.functional.conv_transpose3d(x.contiguous(memory_format=CHANNELS_LAST), weight,
                                                        conv.bias, stride=2, padding=1)
        return original(x, *args, **kwargs)

    return forward


def pin_cpu_inference(net: torch.nn.Module, channels_last: bool = False) -> torch.nn.Module:
    """Fix the CPU inference kernels of `net`: the same seed gives the same bytes on 1 or 2 threads.

    - Every Conv2d/Conv3d runs through oneDNN. PyTorch otherwise picks the convolution backend per call from
      the tensor size and the thread count (1x1 kernels on one thread use its own kernel), so outputs changed in
      the last bits with torch.set_num_threads (oneDNN alone was also about 8% faster). Under bf16 autocast they
      run in bf16, as autocast's own convolution would (torch.mkldnn_convolution is no autocast op: before
      session 42 they ran in float32 there, half the speed on an AMX host).
    - GroupNorm on channels-last input sums in a fixed order (`group_norm_channels_last`).
    - channels_last=True, for nets measured faster with it: in float32 (no bf16 autocast) 3-D convolutions run
      channels-last (the deviation U-Net step 0.64 -> 0.53 s on an AVX2 host), and a nearest x2 upsampling
      followed by a 3x3x3 convolution (MONAI's DiffusionModelUNet) runs as the equivalent stride-2 transposed
      convolution (`upsample_conv_as_transposed_weight`; 13% less per step). bf16 autocast keeps the
      channels-first path (not measured on a bf16 host yet).
    Training (grad enabled) and CUDA are untouched, and so are convolutions oneDNN cannot take as they are
    (non-zero padding modes, "same"/"valid" padding strings)."""
    if not torch.backends.mkldnn.is_available():
        return net
    for module in net.modules():
        if (isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and "_conv_forward" not in module.__dict__
                and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
            module._conv_forward = _onednn_conv_forward(module, module._conv_forward, channels_last)
        if isinstance(module, torch.nn.GroupNorm) and "forward" not in module.__dict__:
            module.forward = _group_norm_forward(module, module.forward)
        upsample_conv = _upsample_conv(module) if channels_last else None
        if upsample_conv is not None and "forward" not in module.__dict__:
            module.forward = _upsample_conv_forward(upsample_conv, module.forward)
    return net
