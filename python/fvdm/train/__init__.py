"""Training: the loop (`fvdm.train.trainer`), checkpoint storage (`fvdm.train.checkpoint`), EMA,
the run lock and torchrun helpers."""
