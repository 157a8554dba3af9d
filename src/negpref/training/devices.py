"""Devices and precision through accelerate."""

from __future__ import annotations


def new_accelerator(**kwargs):
    """An ``accelerate.Accelerator`` with these settings.

    accelerate keeps its settings process-wide and refuses different ones later; in a single
    process (a notebook, a test session, a study running several trainings) each run gets its
    own. Under ``accelerate launch`` the launched settings stay as they are.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(**kwargs)
