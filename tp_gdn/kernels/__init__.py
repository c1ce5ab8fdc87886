"""Kernel backends behind one interface: `check_config` (refuses a model the backend cannot run),
`gdn_mix`, `gdn_mix_norm` (gdn_mix then the gated norm, which the triton backend may form inside
its fused prefill pass) and `gated_rmsnorm`; the triton backend also offers `few_rows_product`,
the projections of decode steps of few tokens, which the layer gives its linear modules, and
`product_norm`, the gated norm for out_proj's few-row product to form as it reads o.

"torch": the plain-torch reference (any device, float64 too). "triton": our Triton kernels
(CUDA, or the CPU under TRITON_INTERPRET=1). Nothing here knows about processes or ranks.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend 'triton' needs a CUDA device (got {device}); on the CPU use backend 'torch', "
            "or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter (tiny shapes only)"
        )
    return backend


def get_ops(backend: str):
    """The module that implements `check_config`, `gdn_mix`, `gdn_mix_norm` and `gated_rmsnorm` for a
    resolved backend."""
    if backend == "torch":
        from . import reference
        return reference
    if backend == "triton":
        from . import triton_ops
        return triton_ops
    raise ValueError(f"unresolved backend {backend!r}")
