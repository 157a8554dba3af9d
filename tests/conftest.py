"""Shared test fixtures."""

import pytest

from negpref.threads import single_threaded


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread avoids oversubscribing the 2-core machine."""
    with single_threaded():
        yield
