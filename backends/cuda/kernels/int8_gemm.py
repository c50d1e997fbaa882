"""int8 x int8 -> int32 GEMM with the dequant / requant epilogue fused (W8A8 linear layers).

Semantics (the Triton kernel and the CPU reference)::

    acc[m, n] = sum_k int32(a_q[m, k]) * int32(b_q_t[n, k])              exact int32
    y[m, n]   = act((float32(acc[m, n]) * a_scale[m]) * b_scale[n] + bias[n])  float32
    out       = y.to(out_dtype)                                           float16 | float32
    out_q     = clamp(rint(y / out_scale) + out_zero, -128, 127)          int8 (requant)

The reference divides, as ONNX QuantizeLinear does; the Triton epilogue multiplies by the
float32 reciprocal of ``out_scale`` (one instruction), which can land one code away at
exact ties (tests allow 1 LSB there and require exact codes elsewhere).

* ``a_q``: int8 ``[M, K]`` (row-major activations, e.g. from :func:`quantize_per_token`).
* ``b_q_t``: int8 ``[N, K]``, the weight stored K-major / transposed (``nn.Linear``'s
  layout; ONNX ``MatMul``'s ``[K, N]`` is transposed once at lowering time), the layout
  Hopper's 8-bit tensor-core instructions read directly.
* ``a_scale``: float32 ``[M]`` (per token) or ``[1]`` (per tensor); ``b_scale``: float32
  ``[N]`` (per output channel) or ``[1]``; ``bias``: float32 ``[N]`` or None (kept in float,
  ALGORITHMS.md §11.4's CUDA option, so no int32 bias overflow).
* ``out_dtype=torch.int32`` returns the raw accumulator (scales ignored): the
  lowering's zero-point correction path uses it.
* ``activation``: None, "relu", "gelu" (erf) or "gelu_tanh", applied to ``y`` before the
  store or the requantization (GELU within float32 rounding of the reference).
* ``requant=(out_scale, out_zero)`` returns int8 codes: ORT's QLinearMatMul semantics,
  "float multiply then round half to even" (§11.5), ``rint`` never round-half-away (§0.2).

Rounding: ``float32(acc)`` rounds to nearest even above 2**24 in both implementations; the
float epilogue may differ from the reference by float32 contraction (fma) only, so float
outputs agree to ~1e-6 relative (float16 outputs to 1 ulp) and requantized codes to 1 LSB.

Dispatch on CUDA (measured on an H100, see ``benchmarks/bench_cuda_gemm.py``): at least two
128x128 output tiles per SM (and M >= 256, 16-byte aligned rows) -> the persistent TMA
kernel; otherwise the pointer kernel, whose M <= 16 configs use 16-row tiles with long K
tiles (a weight-streaming, memory-bound path that beats cuBLAS fp16 at decode shapes, so no
fp16 fallback is needed). On CPU tensors, or without triton, the reference runs instead.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

__all__ = ["int8_gemm", "int8_gemm_reference", "int8_gemm_numpy", "TMA_MIN_M"]

TMA_MIN_M = 256  # the persistent TMA kernel from this M on (int8_gemm's dispatch rule)


def _rint_requant(y: np.ndarray, out_scale: float, out_zero: int) -> np.ndarray:
    q = np.rint(y / np.float32(out_scale)) + np.float32(out_zero)  # rint: round half to even
    return np.clip(q, -128, 127).astype(np.int8)


def int8_gemm_numpy(a_q: np.ndarray, b_q_t: np.ndarray, a_scale: np.ndarray | None = None,
                    b_scale: np.ndarray | None = None, bias: np.ndarray | None = None,
                    out_dtype: Any = np.float32, requant: tuple[float, int] | None = None,
                    activation: str | None = None) -> np.ndarray:
    """NumPy reference of :func:`int8_gemm` (module docstring); ``out_dtype`` a numpy dtype."""
    a_q, b_q_t = np.asarray(a_q), np.asarray(b_q_t)
    _check_activation(activation)
    if a_q.dtype != np.int8 or b_q_t.dtype != np.int8:
        raise TypeError(f"int8_gemm: operands must be int8, got {a_q.dtype} and {b_q_t.dtype}")
    if a_q.ndim != 2 or b_q_t.ndim != 2 or a_q.shape[1] != b_q_t.shape[1]:
        raise ValueError(f"int8_gemm: a_q [M, K] and b_q_t [N, K] expected, got {a_q.shape} and {b_q_t.shape}")
    acc64 = a_q.astype(np.int64) @ b_q_t.astype(np.int64).T
    if np.abs(acc64).max(initial=0) > np.iinfo(np.int32).max:
        raise OverflowError("int8_gemm: int32 accumulator overflow (K too large)")
    acc = acc64.astype(np.int32)
    if requant is None and np.dtype(out_dtype) == np.int32:
        return acc
    m, n = acc.shape
    sa = np.ones(1, np.float32) if a_scale is None else np.asarray(a_scale, np.float32).reshape(-1)
    sb = np.ones(1, np.float32) if b_scale is None else np.asarray(b_scale, np.float32).reshape(-1)
    if sa.size not in (1, m) or sb.size not in (1, n):
        raise ValueError(f"int8_gemm: a_scale must have 1 or {m} entries, b_scale 1 or {n}; got {sa.size}, {sb.size}")
    y = acc.astype(np.float32) * sa[:, None]
    y = y * sb[None, :]
    if bias is not None:
        y = y + np.asarray(bias, np.float32).reshape(1, -1)
    y = _ACTIVATIONS[activation](y)
    if requant is not None:
        return _rint_requant(y, *requant)
    return y.astype(out_dtype)


def _gelu(y: np.ndarray) -> np.ndarray:
    y64 = y.astype(np.float64)
    return (0.5 * y64 * (1.0 + np.frompyfunc(math.erf, 1, 1)(y64 / math.sqrt(2)).astype(np.float64))).astype(np.float32)


def _gelu_tanh(y: np.ndarray) -> np.ndarray:
    y64 = y.astype(np.float64)
    return (0.5 * y64 * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (y64 + 0.044715 * y64**3)))).astype(np.float32)


_ACTIVATIONS = {None: lambda y: y, "relu": lambda y: np.maximum(y, np.float32(0)), "gelu": _gelu, "gelu_tanh": _gelu_tanh}


def _check_activation(activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"int8_gemm: activation must be None, 'relu', 'gelu' or 'gelu_tanh', got '{activation}'")


def _torch():
    import torch

    return torch


_NP_OF = {"torch.float16": np.float16, "torch.float32": np.float32, "torch.int32": np.int32, "torch.int8": np.int8}


def int8_gemm_reference(a_q, b_q_t, a_scale=None, b_scale=None, bias=None, out_dtype=None, requant=None, activation=None):
    """CPU reference with :func:`int8_gemm`'s signature: torch tensors in (any device), torch
    tensors out on the same device. Exact int32 accumulation, float32 epilogue, rint."""
    torch = _torch()
    out_dtype = torch.float16 if out_dtype is None else out_dtype
    dev = a_q.device

    def np_(t):
        return None if t is None else t.detach().cpu().numpy()

    out = int8_gemm_numpy(np_(a_q), np_(b_q_t), np_(a_scale), np_(b_scale), np_(bias),
                          _NP_OF[str(out_dtype)] if requant is None else np.int8, requant, activation)
    return torch.from_numpy(out).to(dev)


def _triton_available() -> bool:
    try:
        from . import _triton_int8_gemm  # noqa: F401
    except ImportError:
        return False
    return True


def int8_gemm(a_q, b_q_t, a_scale=None, b_scale=None, bias=None, out_dtype=None, requant=None, *,
              activation: str | None = None, backend: str = "auto", config: dict | None = None):
    """int8 GEMM with fused epilogue (see the module docstring for layout and numerics).

    ``out_dtype``: ``torch.float16`` (default), ``torch.float32`` or ``torch.int32`` (raw
    accumulator). ``requant=(out_scale, out_zero)`` gives int8 output. ``backend``: "auto"
    (Triton on CUDA tensors, else the reference), "tma" (the persistent TMA kernel), "ptr" (the
    pointer kernel) or "reference". ``config`` pins one kernel config (tests), e.g.
    ``dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_stages=3, num_warps=4)`` for the pointer
    kernel (or, with ``backend="tma"``, one of the TMA kernel's configs).
    """
    torch = _torch()
    out_dtype = torch.float16 if out_dtype is None else out_dtype
    if a_q.dtype != torch.int8 or b_q_t.dtype != torch.int8:
        raise TypeError(f"int8_gemm: operands must be int8, got {a_q.dtype} and {b_q_t.dtype}")
    if a_q.dim() != 2 or b_q_t.dim() != 2 or a_q.shape[1] != b_q_t.shape[1]:
        raise ValueError(f"int8_gemm: a_q [M, K] and b_q_t [N, K] expected, got {tuple(a_q.shape)} and {tuple(b_q_t.shape)}")
    _check_activation(activation)
    if activation is not None and requant is None and out_dtype == torch.int32:
        raise ValueError("int8_gemm: an activation needs a float or requantized output, not the raw int32 accumulator")
    if requant is None and out_dtype not in (torch.float16, torch.float32, torch.int32):
        raise ValueError(f"int8_gemm: out_dtype must be float16, float32 or int32, got {out_dtype}")
    use_ref = backend == "reference" or not a_q.is_cuda or (backend == "auto" and not _triton_available())
    if use_ref:
        return int8_gemm_reference(a_q, b_q_t, a_scale, b_scale, bias, out_dtype, requant, activation)
    from . import _triton_int8_gemm as tk

    M, K = a_q.shape
    N = b_q_t.shape[0]
    dev = a_q.device
    if a_q.stride(1) != 1:
        a_q = a_q.contiguous()
    if b_q_t.stride(1) != 1:
        b_q_t = b_q_t.contiguous()
    if requant is not None:
        epilogue, c_dtype = 2, torch.int8
    elif out_dtype == torch.int32:
        epilogue, c_dtype = 0, torch.int32
    else:
        epilogue, c_dtype = 1, out_dtype

    def vec(t, n, name):
        if t is None:
            return None if epilogue == 0 or name == "bias" else _ones(dev)
        t = t.reshape(-1).to(device=dev, dtype=torch.float32).contiguous()
        if t.numel() not in ((1, n) if name != "bias" else (n,)):
            raise ValueError(f"int8_gemm: {name} has {t.numel()} entries, expected {n}" + (" or 1" if name != "bias" else ""))
        return t

    sa, sb = (None, None) if epilogue == 0 else (vec(a_scale, M, "a_scale"), vec(b_scale, N, "b_scale"))
    bias_ = None if epilogue == 0 else vec(bias, N, "bias")
    out_scale, out_zero = (1.0, 0) if requant is None else (float(requant[0]), int(requant[1]))
    c = torch.empty((M, N), device=dev, dtype=c_dtype)
    if M == 0 or N == 0:
        return c
    if K == 0:
        a_q = torch.zeros((M, 16), device=dev, dtype=torch.int8)
        b_q_t = torch.zeros((N, 16), device=dev, dtype=torch.int8)
    if backend in ("tma", "ptr"):
        kernel = backend
    elif config is not None:
        kernel = "ptr"
    else:
        kernel = "tma" if _use_tma(M, N, dev) and not _TMA_FAILED and tk.tma_supported(a_q, b_q_t) else "ptr"
    if kernel == "tma" and backend != "tma":
        try:
            tk.launch(a_q, b_q_t, c, sa, sb, bias_, epilogue, out_scale, out_zero, "tma", activation=activation)
            return c
        except Exception as e:  # a triton without working TMA descriptors: keep the pointer kernel
            _TMA_FAILED.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"int8_gemm: the TMA kernel failed ({_TMA_FAILED[0][:200]}); using the pointer kernel", RuntimeWarning, stacklevel=2)
            kernel = "ptr"
    tk.launch(a_q, b_q_t, c, sa, sb, bias_, epilogue, out_scale, out_zero, kernel, config, activation)
    return c


_ONES: dict = {}


def _ones(device):
    """A cached float32 [1] of ones per device (a missing scale): no fill kernel per call."""
    if device not in _ONES:
        _ONES[device] = _torch().ones(1, device=device, dtype=_torch().float32)
    return _ONES[device]


_TMA_FAILED: list[str] = []  # set once if the TMA kernel cannot run here


def _use_tma(m: int, n: int, device) -> bool:
    """The dispatch rule: the persistent TMA kernel once there are at least two 128x128
    output tiles per SM (measured on an H100: below that, the pointer kernel's smaller tiles
    fill the GPU better, e.g. M=2048, N=768 and every M=128 shape)."""
    from . import _triton_int8_gemm as tk

    return m >= TMA_MIN_M and -(-m // 128) * -(-n // 128) >= 2 * tk._num_sms(device)
