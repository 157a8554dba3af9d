"""Preference optimization: DPO, generalized-link DPO, ranking NCE, MC-PO / OnMC-PO negatives.
``run(AlignConfig)`` is ``negpref align``; its studies are in ``negpref.studies``."""

from negpref.align.config import AlignConfig
from negpref.align.links import link_dpo
from negpref.align.mcpo import draw, ranking_nce
from negpref.align.trainer import AlignTrainer

__all__ = ["AlignConfig", "AlignTrainer", "draw", "link_dpo", "ranking_nce"]
