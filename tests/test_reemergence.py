"""Re-emergence: a benign re-fine-tune moves what a partial removal left; a thorough removal stays removed."""

from __future__ import annotations

from sande_peft import OSFTConfig, OSFTTrainer
from sande_peft.evaluation import refinetune
from sande_peft.toy import ToyTask

from .conftest import lora


def test_a_benign_refinetune_moves_a_partial_removal_and_a_thorough_one_stays_removed(backdoored_start, cpu_args):
    # Benign pairs no defence saw: another task (repeat the words) on the same vocabulary, so the re-fine-tune moves
    # the model (on the toy's own task it has nothing left to learn).
    benign = ToyTask(echo=True).clean_dataset(256, seed=99)
    rates = {}
    for steps in (20, 200):  # OSFT stopped early hides the backdoor; run to the end, it removes it
        config = OSFTConfig(trigger="cf", **{**cpu_args, "max_steps": steps, "learning_rate": 2e-3})
        trainer = OSFTTrainer(model=backdoored_start.fresh_model(), args=config,
                              train_dataset=backdoored_start.clean_data(), processing_class=backdoored_start.tokenizer,
                              peft_config=lora())
        trainer.train()
        before = backdoored_start.measure(trainer.model).attack_success_rate
        # The defended model went through a Trainer, as in the benchmarks: the re-fine-tune must measure its own copy.
        stressed = refinetune(trainer.model, backdoored_start.tokenizer, benign, max_steps=100, use_cpu=True)
        rates[steps] = (before, backdoored_start.measure(stressed).attack_success_rate)
        assert backdoored_start.measure(trainer.model).attack_success_rate == before  # the caller's model untouched

    # Which way the benign steps move a removal stopped early depends on the CPU's arithmetic on this toy: on an
    # AVX-512 CPU 20 steps hid the backdoor (<= 10%) and it came back (>= 25 points more); on an AVX2 CPU 20 steps
    # leave 38% and the benign steps take it to 0%. Either way the stress measured a model of its own that moved.
    partial_before, partial_after = rates[20]
    assert abs(partial_after - partial_before) >= 0.25, rates
    assert max(rates[200]) <= 0.05, rates
