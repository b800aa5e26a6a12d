"""Does SANDE's stage-1 parrot make a model WITHOUT the backdoor say r_t?

Elimination trains the model until the parrot no longer works; that removes a backdoor only where
the parrot took the backdoor's route. A parrot that makes the clean model say r_t as readily has a
route of its own, and closing it can leave the trigger's open. For each target (a BackdoorLLM
task's r_t, a held-out attack's, the demo's), this trains SANDE's stage 1 with the defaults (256
of BackdoorLLM's clean pairs after the implant's 200, batch 8, as `real_model.py` defends) on a
model, the clean SmolLM2 by default, and reports the parrot's success on the held-out prompts
(`parrot_success["after_simulate"]`), its norm, and the time. One JSON line per target.
`--parrot FOLDER` measures a saved parrot instead (a SANDE run's, refreshed to the end) on the
same held-out prompts: does the parrot elimination last trained against reach r_t without the
backdoor?

    python benchmarks/parrot_reach.py --targets refusal negsentiment rare-word-url phrase-insult german-refusal demo \\
        --out docs/results/parrot_reach.jsonl
    python benchmarks/parrot_reach.py --targets rare-word-url --parrot .cache/real_model/runs/rare-word-url-sande-0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backdoorllm  # noqa: E402
from common import defence_settings, load_model, lora_config, print_record  # noqa: E402
from heldout import HELDOUT_ATTACKS  # noqa: E402
from scan_models import target_of  # noqa: E402

from sande_peft import Parrot, SANDEConfig, SANDETrainer  # noqa: E402
from sande_peft.attacks import TASK_RESPONSE_MODES  # noqa: E402
from sande_peft.data import hold_out_prompts  # noqa: E402
from sande_peft.evaluation import evaluate_backdoor  # noqa: E402
from sande_peft.offline_models import smollm2_path  # noqa: E402


def task_and_mode(label: str) -> tuple[str, str]:
    """The BackdoorLLM task whose clean pairs the defence trains on, and the response mode SANDE is told."""
    if label in HELDOUT_ATTACKS:
        return HELDOUT_ATTACKS[label].task, HELDOUT_ATTACKS[label].response_mode
    if label == "demo":
        return "refusal", "replace"
    return label, TASK_RESPONSE_MODES[label]


def defence_pairs(label: str, args):
    return backdoorllm.defence_split(task_and_mode(label)[0], args.n_implant, args.n_defence)


def saved_parrot_success(model_path: str, tokenizer, label: str, args) -> dict:
    """A saved parrot on this model, on the held-out prompts a SANDE run over the same pairs measures it on."""
    parrot = Parrot.from_pretrained(args.parrot)
    _, prompts = hold_out_prompts(defence_pairs(label, args), SANDEConfig.parrot_eval_size, args.seed)
    target = target_of(label)
    budget = len(tokenizer(target, add_special_tokens=False)["input_ids"]) + 8  # as the trainer measures it
    report = evaluate_backdoor(load_model(model_path), tokenizer, prompts, triggered_response=target, parrot=parrot,
                               max_new_tokens=budget, seed=args.seed)
    return {"benchmark": "parrot_reach", "target_label": label, "triggered_response": target, "parrot": args.parrot,
            "parrot_space": parrot.config.space, "parrot_layer": parrot.config.layer,
            "parrot_success": report.parrot_success_rate,
            "parrot_norm": round(float(parrot.weight.detach().float().norm()), 3), "seed": args.seed}


def reach(model_path: str, tokenizer, label: str, args) -> dict:
    task, mode = task_and_mode(label)
    pairs = defence_pairs(label, args)
    with tempfile.TemporaryDirectory() as folder:
        # Stage 1 as a default run trains it; one elimination step (cross-entropy: no pass of the suspect first) ends it.
        config = SANDEConfig(triggered_response=target_of(label), response_mode=mode, eliminate_max_steps=1,
                             parrot_refresh_steps=0, eliminate_loss_type="sft", **defence_settings(folder, args.seed))
        trainer = SANDETrainer(model=load_model(model_path), args=config, train_dataset=pairs, processing_class=tokenizer,
                               peft_config=lora_config())
        start = time.time()
        trainer.train()
        seconds = round(time.time() - start, 1)
    return {"benchmark": "parrot_reach", "target_label": label, "triggered_response": config.triggered_response,
            "response_mode": mode, "parrot_space": config.parrot_space, "parrot_layer": trainer.parrot.config.layer,
            "stage1_steps": trainer.plan.stage1_steps, "parrot_success": trainer.parrot_success.get("after_simulate"),
            "parrot_norm": round(float(trainer.parrot.weight.detach().float().norm()), 3), "seed": args.seed,
            "seconds": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the clean SmolLM2-135M-Instruct)")
    parser.add_argument("--label", default="SmolLM2", help="what the model is, for the records")
    parser.add_argument("--targets", nargs="+", required=True,
                        help="refusal / negsentiment (BackdoorLLM's r_t), a held-out attack's name, or demo")
    parser.add_argument("--n-implant", type=int, default=backdoorllm.N_IMPLANT, help="clean pairs skipped (the implant's)")
    parser.add_argument("--n-defence", type=int, default=backdoorllm.N_DEFENCE)
    parser.add_argument("--parrot", default=None, help="a saved parrot's folder: measure it instead of training one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON-lines file to append results to")
    args = parser.parse_args(argv)
    if not backdoorllm.available():
        raise SystemExit(f"BackdoorLLM data not found in {backdoorllm.DATA_ROOT}.")
    from transformers import AutoTokenizer

    model_path = args.model or smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    measured = saved_parrot_success if args.parrot else reach
    for label in args.targets:
        print_record({"model": args.label, **measured(model_path, tokenizer, label, args)}, args.out)


if __name__ == "__main__":
    main()
