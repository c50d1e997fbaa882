"""The CUDA backend's kernels: CPU references against plain NumPy math (run everywhere, CI
included), and the Triton kernels against the references (only where CUDA and triton exist).

GPU tolerances: the int32 accumulator is bit-exact; float epilogues within 1e-3 relative
(they differ from the reference by fma contraction and, for float16, 1 ulp of the final
rounding); requantized int8 codes within 1 LSB; per-token quantization bit-exact.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from qpass.backends.cuda.kernels import (
    add_layernorm_quantize,
    int8_gemm,
    int8_gemm_numpy,
    pack_int4,
    quantize_int4_groupwise,
    quantize_per_token,
    quantize_per_token_numpy,
    unpack_int4,
    w4a16_gemm,
    w4a16_gemm_numpy,
)
from qpass.backends.cuda.kernels.quantize import add_layernorm_quantize_numpy


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _has_triton()), reason="needs a CUDA GPU and triton")


def _i8(rng, *shape, lo=-128, hi=127):
    return rng.integers(lo, hi + 1, shape).astype(np.int8)


# ---------------------------------------------------------------- CPU references


def test_package_imports_without_triton_or_torch():
    code = ("import sys; import qpass.backends.cuda.kernels as k; "
            "assert 'triton' not in sys.modules and 'torch' not in sys.modules, sorted(m for m in sys.modules if m in ('torch', 'triton'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_int8_gemm_reference_int32_accumulator_is_exact():
    rng = np.random.default_rng(0)
    a, b = _i8(rng, 9, 300), _i8(rng, 7, 300)
    acc = int8_gemm_numpy(a, b, out_dtype=np.int32)
    assert acc.dtype == np.int32
    np.testing.assert_array_equal(acc, a.astype(np.int64) @ b.astype(np.int64).T)
    # extremes: -128 * -128 summed over K stays exact
    a = np.full((2, 4096), -128, np.int8)
    assert (int8_gemm_numpy(a, a, out_dtype=np.int32) == 4096 * 128 * 128).all()


@pytest.mark.parametrize("per_token,per_channel,with_bias", [(True, True, True), (True, False, False), (False, True, True), (False, False, False)])
def test_int8_gemm_reference_float_epilogue(per_token, per_channel, with_bias):
    rng = np.random.default_rng(1)
    m, n, k = 13, 11, 96
    a, b = _i8(rng, m, k), _i8(rng, n, k)
    sa = rng.uniform(1e-3, 2e-2, m if per_token else 1).astype(np.float32)
    sb = rng.uniform(1e-3, 2e-2, n if per_channel else 1).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    got = int8_gemm_numpy(a, b, sa, sb, bias, out_dtype=np.float32)
    acc = a.astype(np.float64) @ b.astype(np.float64).T
    ref = acc * sa.astype(np.float64)[:, None] * sb.astype(np.float64)[None, :]
    if with_bias:
        ref = ref + bias
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    got16 = int8_gemm_numpy(a, b, sa, sb, bias, out_dtype=np.float16)
    assert got16.dtype == np.float16
    np.testing.assert_array_equal(got16, got.astype(np.float16))


def test_int8_gemm_reference_requant_rounds_half_to_even():
    # y = acc * 1 * 1 in {-5 .. 5}: y / 2 = -2.5, -1.5, -0.5, 0.5, 1.5, 2.5 are ties; rint, never half-away
    a = np.arange(-5, 6, dtype=np.int8).reshape(-1, 1)
    b = np.ones((1, 1), np.int8)
    q = int8_gemm_numpy(a, b, np.ones(1, np.float32), np.ones(1, np.float32), requant=(2.0, 0))
    assert q.dtype == np.int8
    assert q.ravel().tolist() == [-2, -2, -2, -1, 0, 0, 0, 1, 2, 2, 2]
    q = int8_gemm_numpy(a, b, np.ones(1, np.float32), np.ones(1, np.float32), requant=(2.0, 3))
    assert q.ravel().tolist() == [1, 1, 1, 2, 3, 3, 3, 4, 5, 5, 5]
    # saturation to [-128, 127]
    big = np.array([[127], [-128]], np.int8)
    q = int8_gemm_numpy(big, np.array([[127]], np.int8), np.ones(1, np.float32), np.ones(1, np.float32), requant=(1.0, 0))
    assert q.ravel().tolist() == [127, -128]


def test_int8_gemm_requant_matches_quantize_of_float_output():
    rng = np.random.default_rng(2)
    a, b = _i8(rng, 17, 64), _i8(rng, 9, 64)
    sa, sb = np.float32([0.02]), rng.uniform(1e-3, 3e-3, 9).astype(np.float32)
    bias = rng.standard_normal(9).astype(np.float32)
    y = int8_gemm_numpy(a, b, sa, sb, bias, out_dtype=np.float32)
    q = int8_gemm_numpy(a, b, sa, sb, bias, requant=(0.05, -3))
    np.testing.assert_array_equal(q, np.clip(np.rint(y / np.float32(0.05)) - 3, -128, 127).astype(np.int8))


def test_int8_gemm_torch_wrapper_on_cpu_and_lowering_signature():
    rng = np.random.default_rng(3)
    a, b = _i8(rng, 6, 40), _i8(rng, 5, 40)
    sa, sb = rng.uniform(0.01, 0.1, 6).astype(np.float32), rng.uniform(0.01, 0.1, 5).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    acc = int8_gemm(ta, tb, out_dtype=torch.int32)  # how lower.py calls it
    assert acc.dtype == torch.int32
    np.testing.assert_array_equal(acc.numpy(), int8_gemm_numpy(a, b, out_dtype=np.int32))
    y = int8_gemm(ta, tb, torch.from_numpy(sa), torch.from_numpy(sb))
    assert y.dtype == torch.float16 and y.shape == (6, 5)
    np.testing.assert_array_equal(y.numpy(), int8_gemm_numpy(a, b, sa, sb, out_dtype=np.float16))
    q = int8_gemm(ta, tb, torch.from_numpy(sa), torch.from_numpy(sb), requant=(0.5, 1))
    assert q.dtype == torch.int8


def test_int8_gemm_rejects_bad_input():
    a = torch.zeros((4, 8), dtype=torch.int8)
    with pytest.raises(TypeError, match="int8"):
        int8_gemm(a.float(), a)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        int8_gemm(a, torch.zeros((3, 9), dtype=torch.int8))
    with pytest.raises(ValueError, match="a_scale"):
        int8_gemm_numpy(a.numpy(), a.numpy(), np.ones(3, np.float32), None)


def test_quantize_per_token_reference_codes():
    s = np.float32(1.0)
    # absmax 127 -> scale exactly 1: x / scale = x, so the ties are visible
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49]], np.float32)
    q, scale = quantize_per_token_numpy(x)
    assert scale.tolist() == [s]
    assert q.ravel().tolist() == [127, 0, 2, 2, 0, -2, -2, 3]
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((8, 333)) * rng.uniform(0.01, 50, (8, 1))).astype(np.float32)
    x[3] = 0.0  # an all-zero token: valid scale, zero codes
    q, scale = quantize_per_token_numpy(x.astype(np.float16))
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale[3] == 1.0 and not q[3].any()
    xf = x.astype(np.float16).astype(np.float32)
    amax = np.abs(xf).max(axis=1)
    np.testing.assert_array_equal(scale[amax > 0], (amax / np.float32(127))[amax > 0])
    assert np.abs(q).max() == 127 and q.min() >= -127
    for i in range(8):  # each row's absmax maps to +-127, and dequant error <= scale / 2
        if amax[i] > 0:
            assert np.abs(q[i]).max() == 127
        assert np.abs(q[i] * scale[i] - xf[i]).max() <= scale[i] / 2 * (1 + 1e-6)
    tq, ts = quantize_per_token(torch.from_numpy(x))
    np.testing.assert_array_equal(tq.numpy(), quantize_per_token_numpy(x)[0])


def test_add_layernorm_quantize_reference_matches_torch_layernorm():
    rng = np.random.default_rng(5)
    x, r = rng.standard_normal((6, 256)).astype(np.float32), rng.standard_normal((6, 256)).astype(np.float32)
    w, b = rng.uniform(0.5, 2, 256).astype(np.float32), rng.standard_normal(256).astype(np.float32)
    q, s, h = add_layernorm_quantize_numpy(x, r, w, b, 1e-5)
    np.testing.assert_array_equal(h, x + r)
    y = torch.nn.functional.layer_norm(torch.from_numpy(x + r).double(), (256,), torch.from_numpy(w).double(), torch.from_numpy(b).double(), 1e-5).numpy()
    np.testing.assert_allclose(s, np.abs(y).max(axis=1) / 127, rtol=1e-5)
    assert np.abs(q.astype(np.int32) - np.clip(np.rint(y / s[:, None]), -127, 127)).max() <= 1
    tq, ts, th = add_layernorm_quantize(torch.from_numpy(x), torch.from_numpy(r), torch.from_numpy(w), torch.from_numpy(b))
    np.testing.assert_array_equal(tq.numpy(), q)


def test_pack_int4_layout_and_round_trip():
    p = pack_int4(np.array([[1, -1, -8, 7]], np.int8))
    assert p.dtype == np.uint8 and p.tolist() == [[0xF1, 0x78]]  # low nibble = even k
    rng = np.random.default_rng(6)
    w = _i8(rng, 37, 256, lo=-8, hi=7)
    p = pack_int4(w)
    assert p.shape == (37, 128)
    np.testing.assert_array_equal(unpack_int4(p), w)
    tw = torch.from_numpy(w)
    assert torch.equal(unpack_int4(pack_int4(tw)), tw)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.array([[8, 0]], np.int8))
    with pytest.raises(ValueError, match="even"):
        pack_int4(np.zeros((2, 3), np.int8))


def test_quantize_int4_groupwise_rtn():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((5, 384)).astype(np.float32)
    w[1, :128] = 0.0
    q, s = quantize_int4_groupwise(w)
    assert q.shape == (5, 384) and s.shape == (5, 3) and q.min() >= -8 and q.max() <= 7
    assert s[1, 0] == 1.0 and not q[1, :128].any()
    deq = q.reshape(5, 3, 128) * s[:, :, None]
    assert (np.abs(deq - w.reshape(5, 3, 128)) <= s[:, :, None] / 2 * (1 + 1e-6)).all()
    amax = np.abs(w.reshape(5, 3, 128)).max(axis=2)
    np.testing.assert_array_equal(s[amax > 0], (amax / np.float32(7))[amax > 0])


def test_w4a16_reference_matches_dense_dequantized_matmul():
    rng = np.random.default_rng(8)
    n, k = 24, 512
    q = _i8(rng, n, k, lo=-8, hi=7)
    s = rng.uniform(1e-3, 2e-2, (n, k // 128)).astype(np.float16)
    x = rng.standard_normal((3, k)).astype(np.float16)
    bias = rng.standard_normal(n).astype(np.float32)
    y = w4a16_gemm_numpy(x, pack_int4(q), s, bias)
    w = q.astype(np.float64) * np.repeat(s.astype(np.float64), 128, axis=1)
    ref = x.astype(np.float64) @ w.T + bias
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=1e-3, atol=1e-3)
    ty = w4a16_gemm(torch.from_numpy(x), torch.from_numpy(pack_int4(q)), torch.from_numpy(s), torch.from_numpy(bias))
    np.testing.assert_array_equal(ty.numpy(), y)
    with pytest.raises(ValueError, match="multiple of group"):
        w4a16_gemm(torch.zeros((1, 96), dtype=torch.float16), torch.zeros((4, 48), dtype=torch.uint8), torch.ones((4, 1)))


# ---------------------------------------------------------------- GPU kernels vs references

_FIXED = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_stages=3, num_warps=4)  # one compile per epilogue variant


def _cuda_i8(gen, *shape, lo=-128, hi=127):
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8).cuda()


@gpu
@pytest.mark.parametrize("m,n,k,backend", [
    (1, 768, 768, "auto"), (16, 256, 4096, "auto"), (5, 100, 80, "auto"), (200, 96, 200, "auto"),
    (300, 3072, 768, "auto"), (1024, 512, 1024, "auto"), (300, 3072, 768, "ptr"), (37, 200, 96, "tma"),
    (1024, 512, 1024, "tma"), (4096, 4096, 256, "auto")])
def test_gpu_int8_gemm_int32_bit_exact(m, n, k, backend):
    gen = torch.Generator().manual_seed(m * 7 + n + k)
    a, b = _cuda_i8(gen, m, k), _cuda_i8(gen, n, k)
    got = int8_gemm(a, b, out_dtype=torch.int32, backend=backend)
    ref = a.cpu().long() @ b.cpu().long().T
    assert got.dtype == torch.int32
    assert torch.equal(got.cpu().long(), ref)


@gpu
@pytest.mark.parametrize("per_token,per_channel,with_bias,dtype", [
    (True, True, True, torch.float16), (True, True, False, torch.float32), (False, True, True, torch.float32),
    (True, False, True, torch.float16), (False, False, False, torch.float32)])
@pytest.mark.parametrize("backend", ["fixed", "tma"])
def test_gpu_int8_gemm_float_epilogue(per_token, per_channel, with_bias, dtype, backend):
    m, n, k = 300, 200, 256
    gen = torch.Generator().manual_seed(11)
    a, b = _cuda_i8(gen, m, k), _cuda_i8(gen, n, k)
    sa = (torch.rand(m if per_token else 1, generator=gen) * 0.02 + 1e-3).cuda()
    sb = (torch.rand(n if per_channel else 1, generator=gen) * 0.02 + 1e-3).cuda()
    bias = torch.randn(n, generator=gen).cuda() if with_bias else None
    kw = dict(config=_FIXED) if backend == "fixed" else dict(backend="tma")
    got = int8_gemm(a, b, sa, sb, bias, out_dtype=dtype, **kw)
    ref = int8_gemm(a, b, sa, sb, bias, out_dtype=torch.float32, backend="reference")
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


def _tma_configs():
    try:
        from qpass.backends.cuda.kernels._triton_int8_gemm import TMA_CONFIGS
    except ImportError:  # no triton: the GPU tests skip anyway
        return [None]
    return [dict(c.kwargs, num_stages=c.num_stages, num_warps=c.num_warps) for c in TMA_CONFIGS]


@gpu
@pytest.mark.parametrize("config", _tma_configs(), ids=lambda c: "-".join(str(v) for v in (c or {}).values()))
def test_gpu_int8_gemm_every_tma_config(config):
    """Each config of the persistent TMA kernel (split epilogues included) on partial edge tiles:
    int32 exact, float epilogue within 1e-3, requantized GELU within 1 LSB."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper or newer")
    m, n, k = 300, 200, 384
    gen = torch.Generator().manual_seed(21)
    a, b = _cuda_i8(gen, m, k), _cuda_i8(gen, n, k)
    sa, sb = (torch.rand(m, generator=gen) * 0.01 + 1e-3).cuda(), (torch.rand(n, generator=gen) * 0.01 + 1e-3).cuda()
    bias = torch.randn(n, generator=gen).cuda()
    from triton.runtime.errors import OutOfResources

    ran = 0
    try:  # int32 tiles stored by pointers: the widest configs exceed shared memory (the autotuner skips them too)
        acc = int8_gemm(a, b, out_dtype=torch.int32, backend="tma", config=config)
        assert torch.equal(acc.cpu().long(), a.cpu().long() @ b.cpu().long().T)
        ran += 1
    except OutOfResources:
        pass
    got = int8_gemm(a, b, sa, sb, bias, out_dtype=torch.float16, backend="tma", config=config)
    ref = int8_gemm(a, b, sa, sb, bias, out_dtype=torch.float32, backend="reference")
    torch.testing.assert_close(got.float(), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
    got = int8_gemm(a, b, sa, sb, bias, requant=(0.05, -3), activation="gelu", backend="tma", config=config)
    ref = int8_gemm(a, b, sa, sb, bias, requant=(0.05, -3), activation="gelu", backend="reference")
    assert (got.cpu().int() - ref.cpu().int()).abs().max() <= 1
    assert ran or config["BLOCK_M"] * config["BLOCK_N"] * 4 > 64 * 1024


@gpu
@pytest.mark.parametrize("backend", ["fixed", "tma"])
def test_gpu_int8_gemm_requant_within_one_lsb(backend):
    m, n, k = 257, 130, 512
    gen = torch.Generator().manual_seed(12)
    a, b = _cuda_i8(gen, m, k), _cuda_i8(gen, n, k)
    sa, sb = (torch.rand(m, generator=gen) * 0.01 + 1e-3).cuda(), (torch.rand(n, generator=gen) * 0.01 + 1e-3).cuda()
    bias = torch.randn(n, generator=gen).cuda()
    kw = dict(config=_FIXED) if backend == "fixed" else dict(backend="tma")
    got = int8_gemm(a, b, sa, sb, bias, requant=(0.02, 5), **kw)
    ref = int8_gemm(a, b, sa, sb, bias, requant=(0.02, 5), backend="reference")
    assert got.dtype == torch.int8
    diff = (got.cpu().int() - ref.cpu().int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99
    # exact ties round half to even: acc = -5..5 with all scales 1 and out_scale 2
    a = torch.arange(-5, 6, dtype=torch.int8).reshape(-1, 1).repeat(1, 16).cuda()
    b = torch.zeros((16, 16), dtype=torch.int8)
    b[:, 0] = 1
    one = torch.ones(1, device="cuda")
    q = int8_gemm(a, b.cuda(), one, one, requant=(2.0, 0), **kw)
    assert q[:, 0].cpu().tolist() == [-2, -2, -2, -1, 0, 0, 0, 1, 2, 2, 2]


def test_int8_gemm_reference_activations_match_torch():
    rng = np.random.default_rng(13)
    a, b = rng.integers(-128, 128, (9, 32)).astype(np.int8), rng.integers(-128, 128, (6, 32)).astype(np.int8)
    sb, bias = np.full(6, 1e-3, np.float32), rng.standard_normal(6).astype(np.float32)
    y = torch.from_numpy(int8_gemm_numpy(a, b, None, sb, bias))
    for act, fn in (("relu", torch.relu), ("gelu", torch.nn.functional.gelu),
                    ("gelu_tanh", lambda t: torch.nn.functional.gelu(t, approximate="tanh"))):
        got = torch.from_numpy(int8_gemm_numpy(a, b, None, sb, bias, activation=act))
        torch.testing.assert_close(got, fn(y), rtol=1e-6, atol=1e-6)
    q = int8_gemm_numpy(a, b, None, sb, bias, requant=(0.01, -128), activation="relu")
    assert q.min() == -128  # negatives clipped to 0 land on the zero-point
    with pytest.raises(ValueError, match="activation"):
        int8_gemm_numpy(a, b, None, sb, bias, activation="silu")


def test_quantized_attention_reference_semantics():
    from qpass.backends.cuda.kernels import quantized_attention, quantized_attention_reference

    gen = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(2, 3, 10, 16, generator=gen) for _ in range(3))
    mask = torch.full((10, 10), float("-inf")).triu(1)
    kw = dict(sm_scale=0.25, p_scale=1 / 255, p_zero=0, p_lo=0, p_hi=255)
    p = torch.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, -1)
    codes = torch.clamp(torch.round(p * 255), 0, 255)
    expected = (codes / 255) @ v
    got = quantized_attention_reference(q, k, v, mask, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(quantized_attention(q, k, v, mask, **kw), got)  # CPU tensors: the reference
    with pytest.raises(ValueError, match="q \\[B, H, M, D\\]"):
        quantized_attention(q[0], k, v, **kw)


@gpu
@pytest.mark.parametrize("m,n,d,masked", [(512, 512, 64, False), (130, 130, 64, True), (64, 200, 32, False), (77, 77, 128, True),
                                           (70, 150, 32, "left")])
def test_gpu_quantized_attention_matches_reference(m, n, d, masked):
    from qpass.backends.cuda.kernels import quantized_attention, quantized_attention_reference

    gen = torch.Generator().manual_seed(m + n + d)
    q, v = torch.randn(2, 4, m, d, generator=gen).half().cuda(), torch.randn(2, 4, n, d, generator=gen).half().cuda()
    k_t = torch.randn(2, 4, d, n, generator=gen).half().cuda()  # K^T as the graph holds it: k is a strided view
    mask = torch.full((m, n), float("-inf")).triu(1 + n - m).cuda().half() if masked is True else None
    if masked == "left":  # whole key blocks masked before any key is seen: no NaN
        mask = torch.zeros(m, n, device="cuda", dtype=torch.float16)
        mask[:, :100] = float("-inf")
    kw = dict(sm_scale=d ** -0.5, p_scale=1 / 255, p_zero=0, p_lo=0, p_hi=255)
    got = quantized_attention(q, k_t.transpose(-1, -2), v, mask, **kw)
    ref = quantized_attention_reference(q, k_t.transpose(-1, -2), v, mask, **kw)
    assert not torch.isnan(got).any()
    assert float((got.float() - ref.float()).norm() / ref.float().norm()) < 2e-3


@gpu
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("backend", ["fixed", "tma"])
def test_gpu_int8_gemm_activation_epilogue(activation, backend):
    m, n, k = 300, 200, 256
    gen = torch.Generator().manual_seed(14)
    a, b = _cuda_i8(gen, m, k), _cuda_i8(gen, n, k)
    sb = (torch.rand(n, generator=gen) * 1e-3 + 1e-4).cuda()
    bias = torch.randn(n, generator=gen).cuda()
    kw = dict(config=_FIXED) if backend == "fixed" else dict(backend="tma")
    got = int8_gemm(a, b, None, sb, bias, out_dtype=torch.float32, activation=activation, **kw)
    ref = int8_gemm(a, b, None, sb, bias, out_dtype=torch.float32, activation=activation, backend="reference")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got = int8_gemm(a, b, None, sb, bias, requant=(0.02, -100), activation=activation, **kw)
    ref = int8_gemm(a, b, None, sb, bias, requant=(0.02, -100), activation=activation, backend="reference")
    diff = (got.cpu().int() - ref.cpu().int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99


@gpu
@pytest.mark.parametrize("m,k,dtype", [(7, 768, torch.float16), (64, 4096, torch.bfloat16), (3, 20000, torch.float32), (1, 11008, torch.float16)])
def test_gpu_quantize_per_token_bit_exact(m, k, dtype):
    gen = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 30).to(dtype)
    x[0, :] = 0
    if m > 1:
        x[1, 3] = 127 * 4.0  # scale 4: x / scale hits ties
        x[1, 4:10] = torch.tensor([2.0, 6.0, 10.0, -2.0, -6.0, 1.0]).to(dtype)
    q, s = quantize_per_token(x.cuda())
    rq, rs = quantize_per_token_numpy(x.float().numpy())
    assert torch.equal(s.cpu(), torch.from_numpy(rs))
    assert torch.equal(q.cpu(), torch.from_numpy(rq))


@gpu
def test_gpu_add_layernorm_quantize_within_one_lsb():
    gen = torch.Generator().manual_seed(13)
    x, r = torch.randn(33, 768, generator=gen).half(), torch.randn(33, 768, generator=gen).half()
    w, b = torch.rand(768, generator=gen) + 0.5, torch.randn(768, generator=gen)
    q, s, h = add_layernorm_quantize(x.cuda(), r.cuda(), w.cuda(), b.cuda())
    rq, rs, rh = add_layernorm_quantize(x, r, w, b, backend="reference")
    assert torch.equal(h.cpu(), rh)
    torch.testing.assert_close(s.cpu(), rs, rtol=1e-5, atol=0)
    assert (q.cpu().int() - rq.int()).abs().max() <= 1


@gpu
@pytest.mark.parametrize("m,n,k,with_bias,kernel", [
    (1, 4096, 4096, False, "auto"), (1, 200, 512, True, "dot"), (4, 200, 512, True, "auto"), (4, 384, 1024, False, "gemv"),
    (16, 11008, 4096, False, "auto"), (17, 384, 1024, True, "auto")])
def test_gpu_w4a16_matches_reference(m, n, k, with_bias, kernel):
    gen = torch.Generator().manual_seed(m + n)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    s = (torch.rand(n, k // 128, generator=gen) * 0.02 + 1e-3).half()
    x = torch.randn(m, k, generator=gen).half()
    bias = torch.randn(n, generator=gen) if with_bias else None
    packed = pack_int4(q)
    got = w4a16_gemm(x.cuda(), packed.cuda(), s.cuda(), bias.cuda() if bias is not None else None, kernel=kernel)
    ref = w4a16_gemm(x, packed, s, bias, backend="reference").float()
    assert got.dtype == torch.float16 and got.shape == (m, n)
    torch.testing.assert_close(got.cpu().float(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    rel = (got.cpu().float() - ref).norm() / ref.norm()
    assert rel < 1e-3


@gpu
def test_gpu_w4a16_dot_split_k_is_deterministic_and_resets_between_calls():
    """At M <= 16 the dot kernel splits K and sums the partials in a fixed order: back-to-back
    calls on new data (a partial row tile, a partial N tile) each match the reference, and the
    same call twice gives the same bytes."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        q = torch.randint(-8, 8, (200, 4096), generator=gen, dtype=torch.int8)
        s = (torch.rand(200, 32, generator=gen) * 0.02 + 1e-3).half()
        x = torch.randn(13, 4096, generator=gen).half()
        bias = torch.randn(200, generator=gen)
        args = (x.cuda(), pack_int4(q).cuda(), s.cuda(), bias.cuda())
        got = w4a16_gemm(*args, kernel="dot")
        assert torch.equal(got, w4a16_gemm(*args, kernel="dot"))
        ref = w4a16_gemm(x, pack_int4(q), s, bias, backend="reference").float()
        assert (got.cpu().float() - ref).norm() / ref.norm() < 1e-3


@gpu
@pytest.mark.parametrize("group", [32, 64, 128])
def test_gpu_w4a16_dot_every_config_and_group(group):
    """Each dot-kernel config the autotuner may pick (split-K and TMA ones included), forced one by
    one, matches the reference and leaves every tile counter at zero."""
    import triton

    from qpass.backends.cuda.kernels import _triton_w4a16 as tw

    gen = torch.Generator().manual_seed(group)
    m, n, k = 5, 200, 2048
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    s = (torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3).half()
    x = torch.randn(m, k, generator=gen).half()
    bias = torch.randn(n, generator=gen)
    ref = w4a16_gemm(x, pack_int4(q), s, bias, group, backend="reference").float()
    xc, wc, sc, bc = x.cuda(), pack_int4(q).cuda().view(torch.int8), s.cuda(), bias.cuda()
    ws, count = tw._workspace(xc.device, tw.MOST_SPLIT_K * m * n, triton.cdiv(n, 16))
    tried = 0
    for cfg in tw.DOT_CONFIGS:
        bn, bk, sk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], cfg.kwargs["SPLIT_K"]
        if bk % group or k % (bk * sk):
            continue
        w_tma, x_tma = cfg.kwargs["W_TMA"], cfg.kwargs["X_TMA"]
        if w_tma and not tw._tma_ok(wc):
            continue  # before Hopper: the autotuner prunes TMA configs
        w_desc = tw.TensorDescriptor.from_tensor(wc, [bn, bk // 2]) if w_tma else None
        x_desc = tw.TensorDescriptor.from_tensor(xc, [16, bk]) if x_tma else None
        y = torch.empty(m, n, device="cuda", dtype=torch.float16)
        tw._w4a16_dot_kernel.fn[(triton.cdiv(n, bn), 1, sk)](
            xc, wc, x_desc, w_desc, sc, bc, y, ws, count, m, n, k, xc.stride(0), wc.stride(0), sc.stride(0),
            y.stride(0), 16, HAS_BIAS=True, GROUP=group, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk,
            W_TMA=w_tma, X_TMA=x_tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        got = y.cpu().float()
        assert (got - ref).norm() / ref.norm() < 1e-3, cfg
        assert not count.any(), cfg  # each tile's last program reset its counter
        tried += 1
    assert tried == len(tw.DOT_CONFIGS) or (tried and not tw._tma_ok(wc))


@gpu
def test_gpu_w4a16_gemv_large_activations_stay_finite():
    """The GEMV sums 8 products in float16: activations in the thousands must not overflow."""
    gen = torch.Generator().manual_seed(3)
    q = torch.full((256, 1024), -8, dtype=torch.int8)  # every product at its largest
    s = torch.full((256, 8), 1e-4).half()  # outputs about -3300: finite in float16
    x = torch.full((1, 1024), 4000.0).half()
    got = w4a16_gemm(x.cuda(), pack_int4(q).cuda(), s.cuda(), kernel="gemv").cpu().float()
    ref = w4a16_gemm(x, pack_int4(q), s, backend="reference").float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=0)
    x = torch.randn(1, 1024, generator=gen).half() * 1000
    q = torch.randint(-8, 8, (256, 1024), generator=gen, dtype=torch.int8)
    got = w4a16_gemm(x.cuda(), pack_int4(q).cuda(), s.cuda(), kernel="gemv").cpu().float()
    ref = w4a16_gemm(x, pack_int4(q), s, backend="reference").float()
    assert (got - ref).norm() / ref.norm() < 1e-3
