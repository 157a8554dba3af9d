"""Training machinery shared by every loop: checkpoints that verify, keep and never unpickle."""
