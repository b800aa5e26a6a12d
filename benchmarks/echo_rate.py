"""How often each implanted real model starts its answer by repeating the user's text.

SANDE's `echo_rows="auto"` turns echo rows on for a model that echoes (sande_peft.echo).
This measures the same rate, with the same function, on the backdoored SmolLM2 models that
`benchmarks/real_model.py` cached, on 32 clean prompts of the defence's share of BackdoorLLM's
clean training set (the trainer itself asks 16 before training and logs `echo_rate`).

    python benchmarks/echo_rate.py --out docs/results/echo_rate.jsonl

Prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backdoorllm  # noqa: E402
from real_model import REPO, load, machine, print_record  # noqa: E402

from sande_peft.echo import echo_rate  # noqa: E402
from sande_peft.offline_models import smollm2_path  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(REPO / ".cache" / "real_model"))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--first-prompt", type=int, default=200, help="skip the implant's share of the clean set")
    parser.add_argument("--out", default=None, help="JSON-lines file to append results to")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    folders = sorted(p for p in Path(args.cache).glob("backdoored-*") if (p / "config.json").is_file())
    if not folders:
        raise SystemExit(f"No implanted models in {args.cache}: run benchmarks/real_model.py first.")
    for folder in folders:
        _, task, attack, steps = folder.name.split("-", 3)
        prompts = backdoorllm.clean_train(task).select(range(args.first_prompt, args.first_prompt + args.prompts))["prompt"]
        with torch.no_grad():
            rate = echo_rate(load(folder), tokenizer, list(prompts))
        record = {"task": task, "attack": attack, "implant": steps, "model": "SmolLM2-135M-Instruct",
                  "machine": machine(), "n_prompts": args.prompts, "echo_rate": rate}
        print_record(record, args.out)


if __name__ == "__main__":
    main()
