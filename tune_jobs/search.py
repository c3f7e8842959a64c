"""The order a grid's trials start in, and the rule ASHA stops trials by. Both matter because ASHA
is asynchronous: it judges a trial at each rung against the trials that reached that rung before it.

- `ShuffledGrid` runs every point once, in an order shuffled by the sweep's seed. Tune's own grid
  starts trials in nested order, so a space of methods × learning rates runs every method at the
  smallest rate first; the first rungs then fill with the weakest corner of the space and nearly every
  later trial passes them (`bench/tune_asha_vs_grid.py` measured this).
- `BestSoFarASHA` ranks a trial at a rung by the best objective it has reached so far, not its latest.
  The sweep keeps each trial's best epoch, so that is what a trial is worth if stopped now; the latest
  value punishes trials whose objective oscillates, as unlearning's does (GD at a high learning rate
  crosses the utility bound and back from epoch to epoch, and the constrained objective drops by 10
  each time it is under)."""

from __future__ import annotations

import itertools
import json
import math
import random

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher


def grid_points(values: dict[str, list], seed: int) -> list[dict]:
    """Every combination of the listed values, in a seeded random order."""
    keys = list(values)
    points = [dict(zip(keys, combination)) for combination in itertools.product(*(values[k] for k in keys))]
    random.Random(seed).shuffle(points)
    return points


class ShuffledGrid(Searcher):
    def __init__(self, values: dict[str, list], seed: int):
        super().__init__()
        self.points = grid_points(values, seed)
        self.suggested = 0

    def suggest(self, trial_id: str) -> dict | str:
        if self.suggested >= len(self.points):
            return Searcher.FINISHED
        self.suggested += 1
        return dict(self.points[self.suggested - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # the order is fixed up front; results do not change it

    # Tune saves this with the experiment state, so `--resume` does not suggest a point twice.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump({"points": self.points, "suggested": self.suggested}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            state = json.load(f)
        self.points, self.suggested = state["points"], state["suggested"]


class BestSoFarASHA(ASHAScheduler):
    """ASHA fed each trial's running best of the metric. Tune does not checkpoint schedulers, so after
    `--resume` these bests start afresh, as Ray's rung records do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._best: dict[str, float] = {}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return super().on_trial_result(tune_controller, trial, self._best_so_far(trial, result))

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, self._best_so_far(trial, result))

    def _best_so_far(self, trial, result: dict) -> dict:
        if self._metric not in result:
            return result
        signed = max(self._best.get(trial.trial_id, -math.inf), self._metric_op * result[self._metric])
        self._best[trial.trial_id] = signed
        return {**result, self._metric: self._metric_op * signed}


def replay(scheduler, trajectories: list[list[float]], metric: str = "objective", time_attr: str = "epoch") -> list[int]:
    """The epochs each trial would run if these per-epoch values were reported one trial at a time
    (as a sweep with max_concurrent 1 does) to a fresh scheduler: what-if analysis of a finished sweep."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    scheduler.set_search_properties(metric, "max")
    epochs_run = []
    for index, values in enumerate(trajectories):
        trial = SimpleNamespace(trial_id=str(index))
        scheduler.on_trial_add(None, trial)
        epoch = 0
        for epoch, value in enumerate(values, start=1):
            result = {time_attr: epoch, metric: value}
            if scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP or epoch == len(values):
                scheduler.on_trial_complete(None, trial, result)
                break
        epochs_run.append(epoch)
    return epochs_run
