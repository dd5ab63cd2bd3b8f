"""A run's config turned into objects and results.

build: the device, schedule, model and dataset a Config describes (used by train, sample and
eval alike, so a checkpoint always meets the model its config describes). generate: the
zero-shot tasks end to end, in pixel space (used by the trainer's previews, `fvdm sample` and
eval). runs: a trained run on disk (config + checkpoint) loaded for sampling, and the files
`fvdm sample` writes.
"""
