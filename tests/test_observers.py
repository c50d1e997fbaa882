"""Observers: closed-form min-max, per-channel axes, exact histogram merges, the searches."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from qpass.observers import (
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)
from qpass.schemes import QuantSpec, qparams_from_range

ALL = [MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MSEObserver, EntropyObserver]
HISTOGRAM = [PercentileObserver, MSEObserver, EntropyObserver]
SYM = QuantSpec(dtype="int8", symmetric=True)
AFF = QuantSpec(dtype="uint8", symmetric=False)


def _heavy_tailed(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Laplace(0, 1) with a few large outliers."""
    rng = np.random.default_rng(seed)
    x = rng.laplace(size=shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, 5, replace=False)] = [60.0, -45.0, 38.0, 52.0, -30.0]
    return x


def _fq_mse(x: np.ndarray, spec: QuantSpec, scale: np.ndarray, zero: np.ndarray) -> float:
    s, z = np.float64(scale), np.float64(zero)
    q = np.clip(np.rint(x / s) + z, spec.qmin, spec.qmax)
    return float(np.mean(((q - z) * s - x) ** 2))


def _fq_max_error(x: np.ndarray, spec: QuantSpec, scale: np.ndarray, zero: np.ndarray) -> float:
    s, z = np.float64(scale), np.float64(zero)
    return float(np.max(np.abs((np.clip(np.rint(x / s) + z, spec.qmin, spec.qmax) - z) * s - x)))


def _fed(cls, spec, batches, channel_axis=None, **kwargs):
    obs = cls(spec, channel_axis, **kwargs)
    for b in batches:
        obs.update(b)
    return obs


# -- min-max -------------------------------------------------------------------------------


def test_minmax_symmetric_int8_scale_is_amax_over_127():
    obs = MinMaxObserver(SYM)
    obs.update(np.array([[-3.0, 1.0], [5.0, 0.5]], dtype=np.float32))
    obs.update(np.array([-4.5, 2.0]))
    lo, hi = obs.range()
    assert lo.shape == () and hi.shape == ()
    assert (float(lo), float(hi)) == (-4.5, 5.0)
    scale, zero = obs.qparams()
    assert scale.dtype == np.float32 and zero.dtype == np.int64
    assert scale == np.float32(5.0 / 127) and zero == 0
    assert obs.count == 6


def test_minmax_affine_uint8_scale_and_zero_point():
    obs = MinMaxObserver(AFF)
    obs.update(np.array([-2.0, 6.0, 1.0]))
    scale, zero = obs.qparams()
    assert scale == np.float32(8.0 / 255)
    assert zero == 64  # round(2 / (8/255)) = round(63.75)
    pos = MinMaxObserver(AFF)
    pos.update(np.array([1.0, 3.0]))  # zero must stay representable: lo clamps to 0
    assert pos.qparams()[0] == np.float32(3.0 / 255) and pos.qparams()[1] == 0


def test_moving_average_follows_batches_and_refuses_merge():
    obs = MovingAverageMinMaxObserver(SYM, momentum=0.9)
    obs.update(np.array([-1.0, 2.0]))
    obs.update(np.array([-3.0, 4.0, 0.0]))
    lo, hi = obs.range()
    assert float(lo) == pytest.approx(-1.2, abs=1e-12) and float(hi) == pytest.approx(2.2, abs=1e-12)
    per_channel = MovingAverageMinMaxObserver(SYM, channel_axis=0, momentum=0.5)
    per_channel.update(np.array([[1.0, 3.0], [-2.0, 0.0]]))
    per_channel.update(np.array([[5.0, 7.0], [-6.0, -4.0]]))
    np.testing.assert_allclose(per_channel.range()[0], [3.0, -4.0])
    np.testing.assert_allclose(per_channel.range()[1], [5.0, -2.0])
    with pytest.raises(ValueError, match="order"):
        obs.merge(MovingAverageMinMaxObserver(SYM))


# -- per-channel axes -----------------------------------------------------------------------


def test_per_channel_axis_0():
    x = np.random.default_rng(0).normal(size=(3, 4, 5))
    obs = MinMaxObserver(SYM, channel_axis=0)
    obs.update(x)
    lo, hi = obs.range()
    np.testing.assert_array_equal(lo, x.min(axis=(1, 2)))
    np.testing.assert_array_equal(hi, x.max(axis=(1, 2)))
    scale, zero = obs.qparams()
    assert scale.shape == (3,) and zero.shape == (3,)
    np.testing.assert_array_equal(scale, (np.maximum(-lo, hi) / 127).astype(np.float32))


@pytest.mark.parametrize("cls", ALL)
def test_per_channel_last_axis_with_varying_sequence_length(cls):
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(2, 7, 4)) * [1, 2, 3, 4], rng.normal(size=(1, 3, 4)), rng.laplace(size=(5, 4))]
    obs = _fed(cls, SYM, batches, channel_axis=-1)
    rows = np.concatenate([b.reshape(-1, 4) for b in batches])
    lo, hi = obs.range()
    assert lo.shape == (4,) and hi.shape == (4,)
    assert obs.count == rows.size
    if cls is MinMaxObserver:
        np.testing.assert_array_equal(lo, rows.min(0))
        np.testing.assert_array_equal(hi, rows.max(0))
    # every channel equals a per-tensor observer fed that channel alone
    for c in range(4):
        alone = _fed(cls, SYM, [b[..., c] for b in batches])
        assert (float(alone.range()[0]), float(alone.range()[1])) == (lo[c], hi[c])
        if isinstance(obs, HistogramObserver):
            np.testing.assert_array_equal(obs.histogram()[0][c], alone.histogram()[0])


def test_channel_count_mismatch_and_bad_axis_raise():
    obs = PercentileObserver(SYM, channel_axis=1)
    obs.update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="channels"):
        obs.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="out of range"):
        MinMaxObserver(SYM, channel_axis=3).update(np.zeros((2, 3)))


# -- exact merges ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", HISTOGRAM)
@pytest.mark.parametrize("channel_axis", [None, -1])
@pytest.mark.parametrize("max_bins", [16, 2048])
@pytest.mark.parametrize("spec", [SYM, AFF], ids=["sym", "aff"])
def test_histogram_merge_equals_one_observer_in_any_order(cls, channel_axis, max_bins, spec):
    rng = np.random.default_rng(2)
    a = [rng.normal(size=(3, 50, 8)) * 0.01, rng.normal(size=(1, 9, 8)) * 0.1]
    b = [_heavy_tailed(3, (2, 17, 8)), rng.uniform(0.0, 3.0, size=(40, 8))]
    oa = _fed(cls, spec, a, channel_axis, max_bins=max_bins)
    ob = _fed(cls, spec, b, channel_axis, max_bins=max_bins)
    snapshot = oa.histogram()[0]
    assert np.all(oa.histogram()[1] < ob.histogram()[1])  # the merge must re-bin
    everything = np.concatenate([x.reshape(-1, 8) for x in a + b])
    together = everything if channel_axis is not None else everything.ravel()
    one = _fed(cls, spec, [together], channel_axis, max_bins=max_bins)
    candidates = {
        "a.merge(b)": oa.merge(ob),
        "b.merge(a)": ob.merge(oa),
        "a then b": _fed(cls, spec, a + b, channel_axis, max_bins=max_bins),
        "b then a": _fed(cls, spec, b[::-1] + a, channel_axis, max_bins=max_bins),
    }
    for name, obs in candidates.items():
        assert obs.count == one.count, name
        results = zip(obs.histogram() + obs.range() + obs.qparams(), one.histogram() + one.range() + one.qparams())
        for got, want in results:
            np.testing.assert_array_equal(got, want, err_msg=name)
    np.testing.assert_array_equal(oa.histogram()[0], snapshot)  # merge leaves its inputs alone
    counts = one.histogram()[0].reshape(-1, 2 * max_bins)
    assert np.all(counts.sum(1) == len(everything) * (8 if channel_axis is None else 1))
    used = [np.flatnonzero(row) for row in counts]
    assert all(u[-1] - u[0] < max_bins for u in used)


def test_minmax_merge_and_empty_merge():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(9, 3)) * 4
    merged = _fed(MinMaxObserver, SYM, [a], 1).merge(_fed(MinMaxObserver, SYM, [b], 1))
    np.testing.assert_array_equal(merged.range()[1], np.maximum(a.max(0), b.max(0)))
    full = _fed(PercentileObserver, SYM, [a])
    for merged in (full.merge(PercentileObserver(SYM)), PercentileObserver(SYM).merge(full)):
        np.testing.assert_array_equal(merged.histogram()[0], full.histogram()[0])
        assert merged is not full
    with pytest.raises(ValueError, match="same class"):
        full.merge(_fed(MSEObserver, SYM, [a]))
    with pytest.raises(ValueError, match="max_bins"):
        full.merge(PercentileObserver(SYM, max_bins=64))


# -- percentile -----------------------------------------------------------------------------


def test_percentile_within_one_bin_of_numpy():
    x = _heavy_tailed(5, (200, 1000))
    sym = _fed(PercentileObserver, QuantSpec(observer="percentile", percentile=99.9), [x[:150], x[150:]])
    width = float(sym.histogram()[1])
    t = max(-float(sym.range()[0]), float(sym.range()[1]))
    assert abs(t - np.percentile(np.abs(x), 99.9)) <= width
    assert t < 10.0  # the outliers are clipped
    aff_spec = QuantSpec(dtype="uint8", symmetric=False, observer="percentile", percentile=99.9)
    aff = _fed(PercentileObserver, aff_spec, [x])
    lo, hi = aff.range()
    assert abs(float(lo) + np.percentile(-x[x < 0], 99.9)) <= width  # each sign at its own percentile
    assert abs(float(hi) - np.percentile(x[x >= 0], 99.9)) <= width


def test_percentile_affine_by_hand():
    # max_bins 8 -> width 1; negatives {-1.5}: bin [-2, -1), edge -2, clamped to the min;
    # non-negatives {0.25, 0.5, 1.0, 3.5}: counts [2, 1, 0, 1], 75% of the mass ends at 2.0
    spec = QuantSpec(dtype="uint8", symmetric=False, observer="percentile", percentile=75.0)
    obs = PercentileObserver(spec, max_bins=8)
    obs.update(np.array([-1.5, 0.25, 0.5, 1.0, 3.5]))
    assert obs.histogram()[1] == 1.0
    assert [float(v) for v in obs.range()] == [-1.5, 2.0]


def test_percentile_keeps_a_rare_tail():
    # 30 negatives among 10^5 values: a two-sided cut at (100 - p) / 2 of all the mass would clip
    # half of them; each sign's own percentile keeps them
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(0, 10, 100_000), -np.linspace(1, 4, 30)])
    spec = QuantSpec(dtype="uint8", symmetric=False, observer="percentile", percentile=99.99)
    lo, hi = _fed(PercentileObserver, spec, [x]).range()
    assert float(lo) == -4.0
    assert 9.99 < float(hi) <= 10.0


def test_percentile_per_channel_and_clamped_to_data():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5000, 3)) * [0.1, 1.0, 10.0]
    obs = _fed(PercentileObserver, QuantSpec(percentile=99.0), [x], channel_axis=1)
    t = obs.range()[1]
    np.testing.assert_array_less(np.abs(t - np.percentile(np.abs(x), 99.0, axis=0)), obs.histogram()[1])
    full = _fed(PercentileObserver, QuantSpec(percentile=100.0), [x], channel_axis=1)
    np.testing.assert_array_equal(full.range()[1], x.max(0))  # p = 100 is min-max


# -- MSE ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "clip", "ratio"),
    [
        (QuantSpec(observer="mse"), 0.85, 0.8),
        (QuantSpec(dtype="uint8", symmetric=False, observer="mse"), 0.9, 0.9),
        (QuantSpec(dtype="int4", observer="mse"), 0.2, 0.2),
    ],
    ids=["int8", "uint8-affine", "int4"],
)
def test_mse_clips_heavy_tails_and_beats_minmax(spec, clip, ratio):
    x = _heavy_tailed(7, (100_000,))
    mse = _fed(MSEObserver, spec, [x])
    minmax = _fed(MinMaxObserver, spec, [x])
    assert float(mse.range()[1]) < clip * float(x.max())
    assert _fq_mse(x, spec, *mse.qparams()) < ratio * _fq_mse(x, spec, *minmax.qparams())


def test_mse_finds_gaussian_optimum_at_4_bits():
    spec = QuantSpec(dtype="int4", narrow_range=True, observer="mse")
    # reference: argmin over t of E[(x - FQ(x; t))^2] for N(0, 1), by numeric integration
    grid = np.linspace(-10, 10, 200_001)
    density = np.exp(-grid**2 / 2)
    ts = np.arange(2.3, 2.7, 0.002)
    errors = [np.sum((grid - np.clip(np.rint(grid / (t / 7)), -7, 7) * (t / 7)) ** 2 * density) for t in ts]
    reference = ts[np.argmin(errors)]
    assert abs(reference - 2.47) < 0.01
    x = np.random.default_rng(8).standard_normal(1_000_000)
    assert abs(float(_fed(MSEObserver, spec, [x]).range()[1]) - reference) < 0.05


def test_mse_keeps_uniform_data_unclipped():
    x = np.random.default_rng(9).uniform(-1.0, 1.0, 50_000)
    t = float(_fed(MSEObserver, QuantSpec(observer="mse"), [x]).range()[1])
    assert t > 0.97 * x.max()


# -- entropy --------------------------------------------------------------------------------


def _reference_kl_threshold(hist: np.ndarray, width: float, levels: int) -> float:
    """ALGORITHMS.md §12.2 written as plainly as possible (loops over merged bins)."""
    hist = hist[: np.flatnonzero(hist)[-1] + 1].astype(np.float64)
    best_kl, best_i = np.inf, len(hist)
    for i in range(levels, len(hist) + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        step = i // levels
        for j in range(levels):
            start, stop = j * step, (i if j == levels - 1 else (j + 1) * step)
            nonzero = p[start:stop] != 0
            if nonzero.any():
                q[start:stop][nonzero] = hist[start:stop].sum() / nonzero.sum()
        p = np.where(p == 0, 1e-4, p)
        q = np.where(q == 0, 1e-4, q)
        p, q = p / p.sum(), q / q.sum()
        kl = np.sum(p * np.log(p / q))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return (best_i + 0.5) * width


def test_entropy_matches_plain_tensorrt_loop_and_clips_outliers():
    x = _heavy_tailed(10, (200_000,))
    obs = _fed(EntropyObserver, QuantSpec(observer="entropy"), [x[:70_000], x[70_000:]])
    counts, width = obs.histogram()
    m = obs.max_bins
    abs_hist = counts[m:] + counts[:m][::-1]
    t = float(obs.range()[1])
    assert t == _reference_kl_threshold(abs_hist, float(width), 128)
    assert np.percentile(np.abs(x), 99.9) < t < 0.5 * np.abs(x).max()
    again = _fed(EntropyObserver, QuantSpec(observer="entropy"), [x])
    assert float(again.range()[1]) == t  # one batch or two: the same histogram, the same t


def test_entropy_int4_uses_8_levels():
    x = np.random.default_rng(11).laplace(size=50_000)
    obs = _fed(EntropyObserver, QuantSpec(dtype="int4", observer="entropy"), [x], max_bins=256)
    counts, width = obs.histogram()
    abs_hist = counts[256:] + counts[:256][::-1]
    assert float(obs.range()[1]) == _reference_kl_threshold(abs_hist, float(width), 8)
    assert float(obs.range()[1]) < 0.9 * np.abs(x).max()


# -- degenerate and bad input, determinism -----------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("spec", [SYM, AFF, QuantSpec(dtype="int4", narrow_range=True, pow2_scale=True)])
@pytest.mark.parametrize(
    "data", [np.zeros((4, 4)), np.full(10, 3.5), np.array([-2.0])], ids=["zeros", "constant", "one"]
)
def test_degenerate_ranges_give_valid_scales(cls, spec, data):
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        obs = _fed(cls, spec, [data, data])
        lo, hi = obs.range()
        scale, zero = obs.qparams()
    assert np.isfinite(lo) and np.isfinite(hi) and lo <= hi
    assert np.isfinite(scale) and scale > 0
    assert spec.qmin <= zero <= spec.qmax
    assert _fq_max_error(data, spec, scale, zero) <= 0.5 * scale * (1 + 1e-6)  # the value stays representable
    if cls is MinMaxObserver:
        assert (scale, zero) == qparams_from_range(spec, data.min(), data.max())


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_raise(cls, bad):
    obs = cls(SYM, channel_axis=0)
    with pytest.raises(ValueError, match="NaN/Inf"):
        obs.update(np.array([[1.0, bad], [0.0, 2.0]]))
    assert obs.count == 0
    with pytest.raises(ValueError, match="no data"):
        obs.range()


@pytest.mark.parametrize("cls", ALL)
def test_deterministic(cls):
    batches = [_heavy_tailed(12, (30, 16)), _heavy_tailed(13, (7, 16))]
    first, second = _fed(cls, AFF, batches, 1), _fed(cls, AFF, batches, 1)
    for got, want in zip(first.range() + first.qparams(), second.range() + second.qparams()):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(first.range(), first.range()):  # asking twice changes nothing
        np.testing.assert_array_equal(got, want)
    if isinstance(first, HistogramObserver):
        np.testing.assert_array_equal(first.histogram()[0], second.histogram()[0])


def test_make_observer_picks_class_and_channel_axis():
    for name, cls in [
        ("minmax", MinMaxObserver),
        ("moving_average", MovingAverageMinMaxObserver),
        ("percentile", PercentileObserver),
        ("mse", MSEObserver),
        ("entropy", EntropyObserver),
    ]:
        obs = make_observer(QuantSpec(observer=name), channel_axis=1)
        assert type(obs) is cls and obs.channel_axis == 1
    assert make_observer(QuantSpec(granularity="channel", axis=0)).channel_axis == 0
    assert make_observer(QuantSpec()).channel_axis is None


def _reference_counts(x: np.ndarray, width: np.ndarray, max_bins: int) -> np.ndarray:
    """Bin counts from the definition: k = floor(x / w) in slot k + max_bins, one row per channel (float64)."""
    rows = np.atleast_2d(x.astype(np.float64))
    w = np.broadcast_to(np.asarray(width, np.float64), (len(rows),))
    out = np.zeros((len(rows), 2 * max_bins), np.int64)
    for r, (row, wr) in enumerate(zip(rows, w)):
        np.add.at(out[r], np.floor(row / wr).astype(np.int64) + max_bins, 1)
    return out


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("channels", [None, 3, 2100])  # 2100 x 4096 slots: past float32's exact integers
def test_histogram_counts_match_the_definition(monkeypatch, fast, channels):
    import qpass.observers as observers

    monkeypatch.setattr(observers, "_FAST_ADD_AT", fast)
    rng = np.random.default_rng(7)
    obs = PercentileObserver(AFF, None if channels is None else 0)
    data = []
    for scale in (1.0, 0.5, 3.0):  # the third batch widens the bins
        x = (rng.standard_normal((channels or 1, 50)) * scale).astype(np.float32)
        x[0, :4] = [-1e-30, 1e-30, -0.0, 0.0]  # tiny negatives fall in bin -1, tiny positives in bin 0
        data.append(x)
        obs.update(x if channels else x[0])
    counts, width = obs.histogram()
    expected = _reference_counts(np.concatenate(data, axis=1), width, obs.max_bins)
    np.testing.assert_array_equal(counts.reshape(expected.shape), expected)


def test_histogram_unchanged_range_keeps_the_bin_width():
    obs = PercentileObserver(AFF)
    obs.update(np.array([-3.0, 5.0], np.float32))
    exp = obs._exp.copy()
    obs.update(np.array([-1.0, 4.0], np.float32))
    np.testing.assert_array_equal(obs._exp, exp)
    assert obs.histogram()[0].sum() == 4
