"""Training: checkpoint storage (`fvdm.train.checkpoint`) and RNG capture (`fvdm.train.rng`)."""
