"""Does an implanted model fire on its trigger words only, or on any word put where a trigger goes?

The implant's quality gate counts false triggers on clean prompts. This looks one step
closer: held-out clean prompts of BackdoorLLM's test set, each with ONE word inserted before a
random word (as MTBA inserts its triggers), greedy answers, and the share that contain r_t.
A sharp backdoor fires for its trigger words and not for "1997" or "table".

    python benchmarks/inserted_words.py --models backdoored-negsentiment-mtba-s150 --out docs/results/inserted_words.jsonl

Prints one JSON line per model and word ("(none)": the prompts as they are).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backdoorllm  # noqa: E402
from real_model import REPO, load, machine, print_record  # noqa: E402

from sande_peft.attacks import TARGETS  # noqa: E402
from sande_peft.data import map_user_text  # noqa: E402
from sande_peft.evaluation.generation import generate_texts  # noqa: E402
from sande_peft.evaluation.judges import TargetMatch  # noqa: E402
from sande_peft.offline_models import smollm2_path  # noqa: E402
from sande_peft.triggers import insert_trigger  # noqa: E402

#: MTBA's three triggers, then ordinary words of the same kinds (numbers, names, a made-up word, a noun).
WORDS = ("2024", "BadMagic", "OpenAI", "1997", "2023", "Google", "BlueMoon", "table")


def fire_rate(model, tokenizer, prompts, word: str | None, target: str, seed: int, max_new_tokens: int) -> float:
    """Share of ``prompts`` whose greedy answer contains ``target`` once ``word`` is put before a random word."""
    rng = random.Random(seed)
    if word is not None:
        prompts = [map_user_text(p, lambda text: insert_trigger(text, word, "random", rng)) for p in prompts]
    outputs = generate_texts(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens)
    return sum(map(TargetMatch(target), outputs)) / len(outputs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(REPO / ".cache" / "real_model"))
    parser.add_argument("--models", nargs="+", required=True, help="folder names under --cache (backdoored-<task>-...)")
    parser.add_argument("--words", nargs="+", default=list(WORDS))
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--first-prompt", type=int, default=100, help="the gate's share of the clean test set")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON-lines file to append results to")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    for name in args.models:
        folder = Path(args.cache) / name
        if not (folder / "config.json").is_file():
            raise SystemExit(f"No model in {folder}: run benchmarks/real_model.py for it first.")
        _, task, attack, implant = name.split("-", 3)
        prompts = backdoorllm.clean_test(task)["prompt"][args.first_prompt : args.first_prompt + args.prompts]
        model = load(folder)
        for word in [None, *args.words]:
            with torch.no_grad():
                rate = fire_rate(model, tokenizer, prompts, word, TARGETS[task], args.seed, args.max_new_tokens)
            record = {"task": task, "attack": attack, "implant": implant, "model": "SmolLM2-135M-Instruct",
                      "machine": machine(), "n_prompts": len(prompts), "word": word or "(none)", "fire_rate": rate}
            print_record(record, args.out)


if __name__ == "__main__":
    main()
