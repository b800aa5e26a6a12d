"""The removal check on saved models: is r_t still one small perturbation away?

`sande_peft.removal_check` (a latent parrot trained afresh for 12 steps to make the model say r_t, as
the scan's trigger check) on backdoored models, on models a defence cleaned (an adapter folder on its
base) and on models that never had a backdoor, each told the backdoor's r_t (named by a backdoor label,
as `scan_models.py` takes them, or given with --target). One JSON line per model, with the commit,
command and machine; the attack success each model was measured at lives in the records of the run
that made it.

    C=.cache/real_model
    python benchmarks/removal_check_models.py --backdoor negsentiment/badnet \\
        --model backdoored=$C/backdoored-negsentiment-badnet-s150 --model clean:SmolLM2=original \\
        --model "cleaned:null-space-0.9-seed0=$C/runs/negsentiment-badnet-sande-eliminate_null_space=0.9-0" \\
        --out docs/results/removal_check.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_path, print_record  # noqa: E402
from scan_models import target_of  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backdoor", required=True,
                        help="the backdoor whose r_t the check is told: refusal/badnet (BackdoorLLM), a held-out "
                        "attack's name, or demo")
    parser.add_argument("--target", default=None, help="r_t itself, where the backdoor label does not name one")
    parser.add_argument("--model", action="append", required=True, metavar="KIND[:LABEL]=PATH",
                        help="kind: backdoored, cleaned or clean; PATH 'original' is SmolLM2 itself, an adapter folder "
                        "is loaded on its base")
    parser.add_argument("--steps", type=int, default=12, help="the parrot's Adam steps (default: the scan's 12)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    target = args.target or target_of(args.backdoor)
    if not target:
        parser.error(f"--backdoor {args.backdoor!r} names no r_t the benchmarks know: pass --target.")
    from transformers import AutoTokenizer

    from sande_peft import removal_check
    from sande_peft.loading import load_model

    for entry in args.model:
        kind_label, _, path = entry.partition("=")  # the label has no "=", a run folder may
        kind, _, label = kind_label.partition(":")
        path = model_path(path)
        model, _ = load_model(path)
        check = removal_check(model, AutoTokenizer.from_pretrained(path), target, steps=args.steps)
        del model
        print_record({"benchmark": "removal_check", "backdoor": args.backdoor, "kind": kind, "label": label or kind,
                      "path": str(path), "r_t": target, **check.to_dict(), "first_answer": check.answers[0][:80]},
                     args.out)


if __name__ == "__main__":
    main()
