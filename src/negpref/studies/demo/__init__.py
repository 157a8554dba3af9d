"""``negpref demo``: the whole unlearning study on fictitious authors, on a laptop CPU.

1. A TOFU-like corpus (``negpref.data.fictitious``, one corpus seed) and a BPE tokenizer
   trained on it, shared by every seed.
2. Per seed: a small Llama trained on every record (the *target*) and one trained on the
   retain split only (the *retain* model, unlearning's gold standard). Both learn the
   general-knowledge facts. They are cached, keyed by a hash of everything that determines them.
3. Per seed and method: the forget split unlearned from that seed's target with
   ``negpref.unlearn.run``; the TOFU evaluation (``negpref.eval.TofuEvalCallback``) runs after
   every epoch.
4. Every figure as mean and spread over the seeds, each paper claim judged over the seeds,
   ``summary.json`` and a self-contained ``report.html``.

Seeds are independent replicates, run in worker processes (one torch thread each): the
numbers do not depend on how many workers run them. The run is staged and renamed into
``--out`` at the end: a failed run leaves nothing behind.

Modules: ``settings`` (DemoConfig, profiles, the recorded environment), ``models`` (tokenizer,
target and retain models, the cache), ``findings`` (the paper's claims, figures over seeds),
``run`` (the tasks and ``run_demo``), ``report`` (report.html), ``tables`` (README/docs tables:
``python -m negpref.studies.demo.tables``).
"""

from negpref.studies.demo.run import run_demo
from negpref.studies.demo.settings import DEFAULT_METHODS, DEFAULT_SEEDS, DemoConfig

__all__ = ["DEFAULT_METHODS", "DEFAULT_SEEDS", "DemoConfig", "run_demo"]
