"""Where a defence moves the model's next-token prior: in plain text or in its chat format?

The sst2 capability task reads one next token after a plain-text prompt ("Review: ...\\nSentiment:"),
a format no chat-templated training row shows the model. For each pair (a suspect and the model a
defence made from it) this scores the same BackdoorLLM sst2 sentences twice: as the task's plain
prompt, and as a user turn in the model's chat template. For each format it gives the mean
KL(suspect || defended) of the next-token distribution at the answer position, the mean margin
log p(" Positive") - log p(" Negative") before and after, and the suspect's most likely next tokens
with their mean probability before and after. One JSON line per pair, with the commit, command and machine.

    C=.cache/real_model
    python benchmarks/answer_prior.py \\
        --pair negsentiment-badnet $C/backdoored-negsentiment-badnet-s150 $C/runs/negsentiment-badnet-sande-0 \\
        --out docs/results/answer_prior.jsonl

A path is a model folder, or an adapter folder on its base (a cleaned model); ``original`` is
SmolLM2-135M-Instruct itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backdoorllm  # noqa: E402
from common import model_path, print_record  # noqa: E402

FORMATS = ("plain", "chat")
TOP_TOKENS = 8


def prompts(sentences: list[str], tokenizer) -> dict[str, list[str]]:
    """The task's plain prompt, and the same text as a user turn in the chat template."""
    plain = [backdoorllm.SST2_TEMPLATE.format(text=text) for text in sentences]
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True) for text in plain]
    return {"plain": plain, "chat": chat}


@torch.no_grad()
def next_token_logprobs(path: str, texts: list[str], tokenizer) -> torch.Tensor:
    """Log-probabilities of the next token after each text, one row per text."""
    from sande_peft.loading import load_model

    model, _ = load_model(model_path(path), dtype=torch.float32)
    model.eval()
    rows = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        rows.append(torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1))
    del model
    return torch.stack(rows)


def compare(before: torch.Tensor, after: torch.Tensor, tokenizer) -> dict:
    positive, negative = (tokenizer.encode(word, add_special_tokens=False)[0] for word in (" Positive", " Negative"))
    kl = (before.exp() * (before - after)).sum(-1)
    mean_before, mean_after = before.exp().mean(0), after.exp().mean(0)
    top = mean_before.topk(TOP_TOKENS).indices.tolist()
    return {
        "kl": round(float(kl.mean()), 4),
        "margin_before": round(float((before[:, positive] - before[:, negative]).mean()), 3),
        "margin_after": round(float((after[:, positive] - after[:, negative]).mean()), 3),
        "top_tokens": [{"token": tokenizer.decode([i]), "before": round(float(mean_before[i]), 4),
                        "after": round(float(mean_after[i]), 4)} for i in top],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("LABEL", "SUSPECT", "CLEANED"),
                        help="a label, the suspect model's path and the defended model's path")
    parser.add_argument("--sentences", type=int, default=120, help="sst2 sentences scored (the test ones first)")
    parser.add_argument("--out", default=None, help="JSON-lines file to append results to")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    sentences = backdoorllm.sst2_sentences()[: args.sentences]
    cache: dict = {}
    for label, suspect, cleaned in args.pair:
        start = time.time()
        tokenizer = AutoTokenizer.from_pretrained(model_path(suspect))
        texts = prompts(sentences, tokenizer)
        record = {"benchmark": "answer_prior", "label": label, "suspect": suspect, "cleaned": cleaned,
                  "sentences": len(sentences)}
        for fmt in FORMATS:
            scored = []
            for path in (suspect, cleaned):
                key = (path, fmt)
                if key not in cache:
                    cache[key] = next_token_logprobs(path, texts[fmt], tokenizer)
                scored.append(cache[key])
            record[fmt] = compare(*scored, tokenizer)
        record["seconds"] = round(time.time() - start, 1)
        print_record(record, args.out)


if __name__ == "__main__":
    main()
