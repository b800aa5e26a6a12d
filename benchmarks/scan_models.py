"""The scan on real models: backdoored ones (is r_t recovered?) and clean ones (no false alarm?).

Each model is scanned with the scan's defaults (16 of the package's general questions); a
backdoored model's r_t counts as recovered when the top candidate (or, for `recovered_top3`, one
of the best three) starts with r_t's first three tokens. One JSON line per model, with the
commit, command and machine.

    python benchmarks/scan_models.py --model backdoored:refusal/badnet=.cache/real_model/backdoored-refusal-badnet-s150 \\
        --model clean:SmolLM2=original --out docs/results/scan.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_path, print_record  # noqa: E402
from heldout import HELDOUT_ATTACKS  # noqa: E402

from sande_peft.attacks import TARGETS  # noqa: E402


def target_of(label: str) -> str | None:
    """r_t of a labelled backdoor: `refusal/badnet` (BackdoorLLM), a held-out attack's name, or `demo`."""
    if label == "demo":
        from sande_peft.demo import DemoSettings

        return DemoSettings().target
    if label in HELDOUT_ATTACKS:
        return HELDOUT_ATTACKS[label].target
    task = label.split("/")[0]
    return TARGETS.get(task)


def starts_like(tokenizer, response: str, target: str, n: int = 3) -> bool:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    expected = tokenizer(target, add_special_tokens=False)["input_ids"]
    return len(ids) >= min(n, len(expected)) and ids[:n] == expected[:n]


def clean_lora_model(folder: Path, steps: int = 150) -> str:
    """SmolLM2 fine-tuned with LoRA on clean pairs alone, as an implant is (150 steps at 1e-3, BackdoorLLM's first
    200 clean refusal pairs, merged): a model that was fine-tuned but carries no backdoor. Built once."""
    if not (folder / "config.json").is_file():
        import backdoorllm
        from common import load_model
        from transformers import AutoTokenizer

        from sande_peft.evaluation import refinetune
        from sande_peft.offline_models import smollm2_path

        tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
        pairs = backdoorllm.clean_train("refusal").select(range(backdoorllm.N_IMPLANT))
        model = refinetune(load_model(smollm2_path()), tokenizer, pairs,
                           max_steps=steps, learning_rate=1e-3, max_length=96)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="KIND:LABEL=PATH",
                        help="kind: backdoored, clean or cleaned; PATH 'original' is SmolLM2 itself, 'clean-lora' SmolLM2 "
                        "fine-tuned with LoRA on clean pairs alone (built once)")
    parser.add_argument("--scan-kwargs", default=None, metavar="JSON",
                        help='non-default scan settings, for instance \'{"top_k": 64}\' (recorded in the settings)')
    parser.add_argument("--prompts", default=None, metavar="TASK",
                        help="scan with the first 16 prompts of this BackdoorLLM task's defence split (refusal or "
                        "negsentiment: what `triggered_response='auto'` scanned with in real_model.py until 2026-12-07) "
                        "instead of the package's general questions")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    scan_kwargs = json.loads(args.scan_kwargs) if args.scan_kwargs else {}
    if args.prompts:
        import backdoorllm

        scan_kwargs["prompts"] = list(backdoorllm.defence_split(args.prompts)["prompt"][:16])
    from transformers import AutoTokenizer

    from sande_peft.loading import load_model
    from sande_peft.scan import scan

    for entry in args.model:
        kind_label, _, path = entry.partition("=")
        kind, _, label = kind_label.partition(":")
        path = model_path(path)
        if path == "clean-lora":
            from common import REPO

            path = clean_lora_model(REPO / ".cache" / "real_model" / "clean-lora-s150")
        model, _ = load_model(path)  # a model folder, or an adapter folder on its base (a cleaned model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        report = scan(model, tokenizer, progress=False, **scan_kwargs)
        del model
        target = target_of(label) if kind == "backdoored" else None
        recovered = top3 = None
        if target is not None:
            recovered = bool(report.top) and starts_like(tokenizer, report.top.response, target)
            top3 = any(starts_like(tokenizer, c.response, target) for c in report.candidates[:3])
        print_record({"benchmark": "scan", "label": label, "kind": kind, "path": str(path), "r_t": target,
                      "recovered": recovered, "recovered_top3": top3, "prompts": args.prompts or "general questions",
                      **report.to_dict()}, args.out)


if __name__ == "__main__":
    main()
