"""TOFU's eval file names and the keys of our logs: what evaluating (``negpref.eval.tofu``) and
reading the logs back (``negpref.eval.tofu_logs``) both need, so neither imports the other's
names. The format itself is described in ``negpref.eval.tofu_logs``."""

from __future__ import annotations

RETAIN_FILE = "eval_log.json"
FORGET_FILE = "eval_log_forget.json"
REAL_AUTHORS_FILE = "eval_real_author_wo_options.json"
WORLD_FACTS_FILE = "eval_real_world_wo_options.json"
HOLDOUT_FILE = "eval_log_holdout.json"
META_KEY = "negpref_meta"  # how the logs were made (prompt format, conventions); not a set

# Set kind -> log file, in TOFU's order. Utility sets feed model utility; forget feeds quality.
EVAL_FILES = {
    "retain": RETAIN_FILE,
    "real_authors": REAL_AUTHORS_FILE,
    "world_facts": WORLD_FACTS_FILE,
    "forget": FORGET_FILE,
}


def short_list(indices, limit: int = 10) -> str:
    """``1, 2, 3 (and 7 more)``: item indices for error messages."""
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" (and {len(indices) - limit} more)" if len(indices) > limit else "")
