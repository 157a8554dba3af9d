"""Shared test fixtures and the rounding bound every floating-point tolerance is derived from."""

import pytest
import torch

from negpref.threads import single_threaded

FP32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7
FP64_EPS = torch.finfo(torch.float64).eps  # 2.22e-16


def rounding_bound(dtype: torch.dtype, terms: int, magnitude: float) -> float:
    """Worst-case rounding error of `terms` floating-point operations (a sum of `terms` values,
    or a closed form of `terms` roundings) on values of size `magnitude`: eps * terms * magnitude
    (Higham's n*u bound for recursive summation, with eps = 2u as a factor-2 margin)."""
    return torch.finfo(dtype).eps * terms * magnitude


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread avoids oversubscribing the 2-core machine."""
    with single_threaded():
        yield
