"""
Where the work runs, one function for every script: setup_compute() picks the device (cuda >
mps > cpu), the dtype (bf16 where the GPU has it) and the autocast that goes with it, and turns
on TF32 matmuls on GPUs; peak_flops() is what MFU is measured against.
"""

import contextlib
import ctypes
import sys
from dataclasses import dataclass

import torch

from errors import ConfigError


@dataclass(frozen=True)
class Compute:
    device: torch.device
    dtype: torch.dtype
    autocast: object  # a context manager: mixed precision, or nothing in float32


def setup_compute(cfg, device=None):
    """Device (cfg.device unless given), dtype and autocast for cfg; TF32 matmuls on GPUs."""
    device = device or pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if device.type == "cuda":  # TF32 on Ampere+ float32 matmuls: ~free speed, tiny precision cost
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        keep_freed_memory()
    return Compute(device, dtype, autocast_context(device, dtype))


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is visible; use device=cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device=mps but this machine has no Apple GPU (MPS); use device=cpu or auto")
    return torch.device(name)


def pick_dtype(name, device):
    if name == "auto":  # bf16 where the tensor cores have it (Ampere, capability 8.0, and later):
        # is_bf16_supported() also counts the slow emulation on V100 and T4
        bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast_context(device, dtype):
    """Mixed precision: matmuls in bf16/fp16, weights and optimizer state stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_freed_memory():
    """Training on a CPU frees and re-allocates the same activation buffers every step. glibc
    returns blocks over 128 KiB to the OS as soon as they are freed (mmap/munmap), so every step
    would fault them in again page by page. Higher mmap and trim thresholds keep freed memory in
    the process for reuse (the measured effect is in docs/LOG.md)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into the process
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # only blocks over 32 MiB (rare at CPU sizes) still go straight to the OS
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def peak_flops(device):
    """Dense bf16 tensor-core peak of the GPU, for MFU; None where unknown (CPU, MPS)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # vendor datasheets, dense (without sparsity); V100 and T4: fp16, they have no bf16
    table = {"B200": 2250e12, "H200 NVL": 835e12, "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
             "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12,
             "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
    # the longest name that matches: "H100 PCIe" before "H100", "L40S" before "L40" and "L4"
    return next((table[k] for k in sorted(table, key=len, reverse=True) if k in name), None)
