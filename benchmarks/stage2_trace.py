"""Along SANDE's stage 2: where removal, the task and the parrots stand every few elimination steps.

A Trainer callback shared by the benchmarks (``echo_toy.py --trace-every``, ``real_model.py
--trace-every``, ``demo_variants.py --trace_every``). Each point holds the benchmark's own measurement of the model as it is then
(attack success, and whatever else ``measure_now`` returns), and how often, on the trainer's
held-out clean prompts, r_t is elicited by the parrot as it is (refreshed), by the parrot as stage
1 left it, and by copies of the stage-1 parrot trained a few parrot steps against the model as it
is (what ``parrot_refresh_stop_success`` checks; one entry per budget in ``copy_steps``), with the
refreshed parrot's loss on r_t at its latest refresh step and, graded, the mean per-token NLL of r_t
on the held-out prompts under each parrot and under none (``*_nll``). The
measurements draw generations in the middle of training, so a traced run is not step for step
the untraced one.
"""

from __future__ import annotations

from transformers import TrainerCallback

from sande_peft.schedule import Stage


class Stage2Trace(TrainerCallback):
    """Every ``every`` elimination steps (and after the last), append a point to ``points``."""

    def __init__(self, trainer, every: int, measure_now, copy_steps: tuple[int, ...] = (), parrots: bool = True):
        self.trainer, self.every, self.measure_now, self.copy_steps = trainer, every, measure_now, tuple(copy_steps)
        self.parrots = parrots  # False: no generations with the refreshed and stage-1 parrots (copies when asked)
        self.points, self.stage1_parrot = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.trainer.plan.stage1_steps and self.stage1_parrot is None:
            self.stage1_parrot = self.trainer.parrot.weight.detach().clone()

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        segment = trainer.plan.segment_at(state.global_step - 1)
        if segment.stage is not Stage.ELIMINATE:
            return
        done = trainer.plan.eliminate_index(state.global_step - 1) + 1
        if done % self.every and state.global_step < trainer.plan.total_steps:
            return
        trainer.model.eval()
        point = {"eliminate_steps": done, **self.measure_now(trainer.model)}
        if self.parrots:
            point["parrot_success"] = trainer.measure_parrot(segment)["parrot_success_rate"]
        # Teacher-forced, per r_t token on the held-out prompts: graded where the greedy successes are all or nothing.
        point["refresh_loss"] = trainer.last_refresh_loss
        point["parrot_nll"] = trainer.parrot_target_nll(segment)
        point["no_parrot_nll"] = trainer.parrot_target_nll(segment, with_parrot=False)
        with trainer.parrot_weights(self.stage1_parrot):
            if self.parrots:
                point["stage1_parrot_success"] = trainer.parrot_success_rate(segment)
            point["stage1_parrot_nll"] = trainer.parrot_target_nll(segment)
        for steps in self.copy_steps:
            with trainer.retrained_parrot(segment, done // self.every, self.stage1_parrot, steps):
                point[f"copy_{steps}_success"] = trainer.parrot_success_rate(segment)
                point[f"copy_{steps}_nll"] = trainer.parrot_target_nll(segment)
        trainer.model.train()
        self.points.append(point)
        print({"trace": point}, flush=True)
