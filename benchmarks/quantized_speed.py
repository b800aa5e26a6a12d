"""What training on a 4-bit base costs against fp32, same model, batches and steps, in one run. Prints JSON.

    python benchmarks/quantized_speed.py      # SmolLM2-135M-Instruct; a CPU computes in fp32, a GPU in bf16

For planning a `real_model.py --quantized` run: the median step of trl's `SFTTrainer` and of SANDE's two
stages (`sande_speed.py`'s workers, stage 1 with its refresh steps, the parrot unmeasured), on the fp32 model
(shape ``smollm2``) and on its 4-bit NF4 form (``smollm2-4bit``), with each ratio 4-bit / fp32 and peak
memory. The workers alternate, so drift in the machine's speed hits both forms.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_record  # noqa: E402
from speed_common import machine, run_worker  # noqa: E402

SANDE_SPEED = Path(__file__).resolve().parent / "sande_speed.py"
FORMS = {"fp32": "smollm2", "4bit": "smollm2-4bit"}
# each worker kind's step times, by the name the record gives them
STEPS = {"sft": {"sft_step": "median_step_s"},
         "sande": {"stage1_step": "stage1_median_step_s", "stage2_step": "stage2_median_step_s"}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="steps per stage (and for SFT)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two forms this many times")
    parser.add_argument("--out", default=None, help="JSON-lines file to append the result to")
    args = parser.parse_args(argv)
    runs = {(kind, form): [] for kind in STEPS for form in FORMS}
    for _ in range(args.repeats):
        for kind in STEPS:
            for form, shape in FORMS.items():
                runs[kind, form].append(run_worker(SANDE_SPEED, ["--kind", kind, "--shape", shape, "--steps",
                                                                 str(args.steps), "--warmup", str(args.warmup)]))
    record = {"benchmark": "quantized_speed", "model": "SmolLM2-135M-Instruct", "machine": machine(),
              "steps_per_stage": args.steps, "repeats": args.repeats}
    for kind, keys in STEPS.items():
        for name, key in keys.items():
            step = {form: min(r[key] for r in runs[kind, form]) for form in FORMS}
            record[f"{name}_fp32_s"], record[f"{name}_4bit_s"] = step["fp32"], step["4bit"]
            record[f"{name}_4bit_ratio"] = step["4bit"] / step["fp32"]
        memory = {form: max(r["peak_memory_mb"] for r in runs[kind, form]) for form in FORMS}
        record[f"{kind}_peak_memory_4bit_ratio"] = memory["4bit"] / memory["fp32"]
    record["runs"] = {f"{kind}/{form}": rs for (kind, form), rs in runs.items()}
    print_record(record, args.out)


if __name__ == "__main__":
    main()
