"""Unlearning engine: ``negpref.unlearn(config) -> UnlearnResult``.

``negpref.unlearn`` is both this package and a function: calling the module runs
``run(config, **kwargs)``, so a notebook can write ``negpref.unlearn(UnlearnConfig(...))``.
"""

import sys
import types

from negpref.training.run_log import TrainState
from negpref.unlearn.config import UnlearnConfig
from negpref.unlearn.objectives import FORGET_LOSSES, PRESETS, ForgetLoss, Objective, Preset
from negpref.unlearn.runner import UnlearnResult, run
from negpref.unlearn.trainer import UnlearnTrainer

__all__ = [
    "FORGET_LOSSES",
    "PRESETS",
    "ForgetLoss",
    "Objective",
    "Preset",
    "TrainState",
    "UnlearnConfig",
    "UnlearnResult",
    "UnlearnTrainer",
    "run",
]


class _CallableModule(types.ModuleType):
    def __call__(self, config: UnlearnConfig, **kwargs) -> UnlearnResult:
        return run(config, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
