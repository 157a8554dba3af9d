"""negpref: preference optimization and machine unlearning with negative examples."""

__version__ = "0.1.0"
