"""The ``joint`` trainer (registered by :mod:`srde_plugins.trainers`)."""

from __future__ import annotations

from srde_core.train.driver import TrainingTarget, drive
from srde_core.train.objective import Objective, supervised_step
from srde_core.train.trainer import Trainer


class Joint(Trainer):
    """Joint SRDE training: routers and expert deltas on the frozen base, with the recipe's losses."""

    def __init__(self, params):
        self.params = params

    def run(self, run, phase):
        experts = run.attach_experts()
        target = TrainingTarget(
            model=run.model,
            parameters=list(experts.trainable_parameters().values()),
            get_state=experts.adapter.state_dict,
            set_state=experts.adapter.load_state_dict,
        )
        objective = Objective(run, phase, run.model, experts)
        return drive(run, phase, target, supervised_step(objective), state=objective.schedules)
