"""SANDE's stage plan on its own, without a model: segments, step counts, learning-rate factors, rows, resume checks."""

from __future__ import annotations

import pytest

from sande_peft.schedule import Row, Stage, StagePlan, steps_for


def test_segments_put_every_elimination_step_after_its_refresh_steps():
    plan = StagePlan(stage1_steps=3, stage2_steps=2, refresh_steps=2)
    assert [(s.stage, s.start, s.steps, s.refresh, s.measure) for s in plan.segments] == [
        (Stage.SIMULATE, 0, 3, False, True),
        (Stage.SIMULATE, 3, 2, True, False), (Stage.ELIMINATE, 5, 1, False, False),
        (Stage.SIMULATE, 6, 2, True, False), (Stage.ELIMINATE, 8, 1, False, True),
    ]
    assert plan.total_steps == 9
    assert [plan.stage_at(s).number for s in range(9)] == [1, 1, 1, 1, 1, 2, 1, 1, 2]
    assert [plan.eliminate_index(s) for s in (5, 8)] == [0, 1]


def test_a_fixed_parrot_and_a_refresh_interval():
    assert [(s.stage.number, s.steps) for s in StagePlan(2, 5).segments] == [(1, 2), (2, 5)]
    plan = StagePlan(0, 5, refresh_steps=1, refresh_interval=2)
    assert [(s.stage.number, s.steps) for s in plan.segments] == [(1, 1), (2, 2), (1, 1), (2, 2), (1, 1), (2, 1)]
    assert plan.segments[-1].measure and not plan.segments[1].measure
    assert plan.total_steps == 8


def test_step_counts_follow_epochs_the_cap_and_max_steps():
    # 200 pairs at clean_ratio 0.5: 200 parrot rows + 200 clean rows in stage 2
    assert StagePlan.for_run(200, 8, 0.5, -1, 2.0, -1, 5.0, 100, 2).stage1_steps == 50
    assert StagePlan.for_run(200, 8, 0.5, -1, 2.0, -1, 5.0, 100, 2).stage2_steps == 100  # 250 capped
    assert StagePlan.for_run(200, 8, 0.5, -1, 2.0, -1, 5.0, None, 2).stage2_steps == 250  # no cap: epochs decide
    assert StagePlan.for_run(200, 8, 0.5, -1, 2.0, -1, 1.0, 100, 2).stage2_steps == 50  # fewer epochs than the cap
    assert StagePlan.for_run(200, 8, 0.5, 7, 2.0, 9, 5.0, 100, 2).stage1_steps == 7
    assert StagePlan.for_run(200, 8, 0.5, 7, 2.0, 9, 5.0, 100, 2).stage2_steps == 9  # max_steps wins, as in trl
    assert steps_for(10, 1.0, -1, 8) == 2  # a last partial batch is a step


def test_learning_rate_factors_give_each_stage_its_own_parameters():
    plan = StagePlan(2, 3, refresh_steps=1)
    stage2 = [1.0, 0.5, 0.25]
    model, parrot = plan.lr_lambdas(lambda k: stage2[k], n_model_groups=1)
    assert [model(s) for s in range(plan.total_steps)] == [0, 0, 0, 1.0, 0, 0.5, 0, 0.25]
    assert [parrot(s) for s in range(plan.total_steps)] == [1, 1, 1, 0, 1, 0, 1, 0]


def test_rows_fill_every_step_with_its_stage_and_mix_clean_pairs():
    plan = StagePlan(2, 4, refresh_steps=1)
    rows = plan.rows(n_examples=10, global_batch_size=4, clean_ratio=0.5, seed=3)
    assert len(rows) == plan.total_steps * 4
    for step in range(plan.total_steps):
        stages = {r.stage for r in rows[4 * step : 4 * step + 4]}
        assert stages == {plan.stage_at(step)}
    eliminate = [r for r in rows if r.stage is Stage.ELIMINATE]
    assert {r.parrot for r in eliminate} == {True, False}  # parrot rows beside clean rows
    assert all(r.parrot for r in rows if r.stage is Stage.SIMULATE)
    assert rows == plan.rows(n_examples=10, global_batch_size=4, clean_ratio=0.5, seed=3)  # a resumed run replays them
    assert rows != plan.rows(n_examples=10, global_batch_size=4, clean_ratio=0.5, seed=4)
    assert isinstance(rows[0], Row)


def test_a_checkpoint_of_another_plan_is_refused():
    plan = StagePlan(4, 10, refresh_steps=2, refresh_interval=2)
    plan.check_matches(plan.to_dict())
    with pytest.raises(ValueError, match="same dataset, batch size"):
        plan.check_matches({**plan.to_dict(), "parrot_refresh_interval": 1})
    with pytest.raises(ValueError, match="stage-2 steps >= 1"):
        StagePlan(4, 0)
    with pytest.raises(ValueError, match="refresh_interval"):
        StagePlan(4, 2, refresh_steps=1, refresh_interval=0)


def test_stage1_extensions_leave_every_other_steps_rows_as_they_were():
    plain, extended = StagePlan(3, 4, refresh_steps=1), StagePlan(3, 4, refresh_steps=1, extension_steps=2, extensions=3)
    assert extended.stage1_end == 9 and extended.total_steps == plain.total_steps + 6
    assert [s.extension for s in extended.segments[:5]] == [False, True, True, True, False]
    rows, extended_rows = plain.rows(12, 4, 0.5, seed=0), extended.rows(12, 4, 0.5, seed=0)
    # A run whose parrot passes its bar in the planned steps skips the extensions and trains on the same rows.
    assert extended_rows[:12] + extended_rows[36:] == rows
    assert {r.stage for r in extended_rows[12:36]} == {Stage.SIMULATE}


def test_a_checkpoint_with_other_extensions_is_refused():
    plan = StagePlan(4, 10, refresh_steps=2, extension_steps=5, extensions=2)
    plan.check_matches(plan.to_dict())
    with pytest.raises(ValueError, match="same `parrot_extension_steps` and `parrot_max_extensions`"):
        plan.check_matches({**plan.to_dict(), "parrot_max_extensions": 4})
    StagePlan(4, 10, 2).check_matches({"stage1_steps": 4, "stage2_steps": 10, "parrot_refresh_steps": 2})  # older state
    with pytest.raises(ValueError, match="extension_steps"):
        StagePlan(4, 10, extensions=2)
