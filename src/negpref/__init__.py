"""negpref: preference optimization and machine unlearning with negative examples."""

__version__ = "0.1.0"
from negpref import unlearn as unlearn  # callable: negpref.unlearn(config) -> UnlearnResult
