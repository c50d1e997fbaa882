"""``triton.autotune`` with a shorter benchmark per config (5 ms warm-up, 25 ms of runs
instead of 25/100), where this triton's autotuner accepts a ``do_bench``."""

from __future__ import annotations

import inspect

import triton
import triton.testing


def _quick_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def autotune(**kwargs):
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        kwargs.setdefault("do_bench", _quick_bench)
    return triton.autotune(**kwargs)
