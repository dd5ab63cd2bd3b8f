"""`python tests/slow_cli.py DELAY ARGS...`: `python -m fvdm ARGS` with every training step
followed by a DELAY-second sleep (the trainer's on_step callback), so that a test's signal or
time budget lands mid-run."""

from __future__ import annotations

import sys
import time


def slow_steps(delay: float) -> None:
    """From now on, every Trainer of this process sleeps `delay` seconds after each step."""
    from fvdm.train import trainer

    init = trainer.Trainer.__init__

    def slowed(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "on_step": lambda step: time.sleep(delay)})

    trainer.Trainer.__init__ = slowed


if __name__ == "__main__":
    slow_steps(float(sys.argv.pop(1)))
    from fvdm.cli import main

    main()
