"""Re-emergence: a removal that only hides the backdoor comes back after a benign re-fine-tune; one that removes it
stays removed."""

from __future__ import annotations

from sande_peft import OSFTConfig, OSFTTrainer
from sande_peft.evaluation import refinetune
from sande_peft.toy import ToyTask

from .conftest import lora


def test_a_shallow_removal_comes_back_after_a_benign_refinetune_and_a_thorough_one_stays_removed(
    backdoored_start, cpu_args
):
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

    hidden_before, hidden_after = rates[20]
    assert hidden_before <= 0.1, rates
    assert hidden_after >= hidden_before + 0.25, rates  # it came back
    assert max(rates[200]) <= 0.05, rates
