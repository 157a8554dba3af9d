"""The one training engine: ``NegprefTrainer`` on ``transformers.Trainer`` (``trainer``), the
shared config base (``config``), checkpoints that verify and never unpickle (``checkpoint``)
and the run directory's logs (``run_log``)."""
