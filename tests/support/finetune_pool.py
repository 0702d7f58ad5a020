"""A pool trainer actor whose steps take at least `STEP_S`, so that tests can cancel a job or kill its node
while it trains (a tiny model's steps take milliseconds). Lives here, not in a test module, so that the pool's
nodes import it by name (PYTHONPATH is the repository there)."""

from __future__ import annotations

import time

from cumulo.cluster.finetune_runner import TrainerActor

STEP_S = 0.3


class SlowTrainerActor(TrainerActor):
    def should_stop(self) -> bool:
        time.sleep(STEP_S)
        return super().should_stop()
