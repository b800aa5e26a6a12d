"""Clean pairs the suspect model writes itself, for a defender who has few.

A chat model asked to continue its chat template's user header writes a user turn: the kind
of request it was tuned on (Magpie, Xu et al. 2024). Its greedy answer to that turn is clean
unless the turn carries the trigger, which a few hundred sampled turns almost never do, and an
answer that says the triggered response is dropped all the same. What such pairs do for the
model's utility, measured, is in docs/results.md ("A defender with 128 clean pairs").

>>> from sande_peft.toy import toy_model, toy_tokenizer
>>> pairs = self_instructed_pairs(toy_model(), toy_tokenizer(), 2, max_attempts=4, progress=False)
>>> pairs.column_names
['prompt', 'completion']
"""

from __future__ import annotations

import logging

import torch
from datasets import Dataset

from .evaluation.generation import answer_pairs
from .evaluation.judges import TargetMatch, normalize_text

logger = logging.getLogger(__name__)

_SENTINEL = "\u2063SANDE-USER-TURN\u2063"


def user_turn_prefix(tokenizer, system_prompt: str | None = None) -> tuple[str, str]:
    """The chat template's text before a user turn's content, and the text that closes the turn.

    Whatever the template adds by default (a system message, a date) stays: it is the context the
    model was tuned to write user turns in.

    >>> from sande_peft.toy import toy_tokenizer
    >>> user_turn_prefix(toy_tokenizer())
    ('user : ', ' </s> ')
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if not getattr(tok, "chat_template", None):
        raise ValueError("Self-instructed pairs need a chat model: the tokenizer has no `chat_template`.")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": _SENTINEL}]
    text = tok.apply_chat_template(messages, tokenize=False)
    if text.count(_SENTINEL) != 1:
        raise ValueError("The chat template does not write a user turn's content verbatim; build the pairs yourself.")
    prefix, closing = text.split(_SENTINEL)
    return prefix, closing


def self_instructed_prompts(
    model,
    tokenizer,
    n: int,
    *,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    temperature: float = 1.0,
    top_p: float = 0.95,
    min_words: int = 3,
    max_attempts: int | None = None,
    exclude: tuple[str, ...] = (),
    seed: int = 0,
    progress: bool = True,
) -> list[list[dict]]:
    """Up to ``n`` distinct user turns the model writes itself, as one-message conversations.

    A sampled turn is kept when the model closes it within ``max_new_tokens`` (its end-of-turn token, or a
    paragraph break after a full sentence: the turn is then its first paragraph), has at
    least ``min_words`` words, repeats no kept turn, and contains none of ``exclude`` (case and spacing aside).
    At most ``max_attempts`` turns are sampled (default ``8 * n``); fewer than ``n`` kept is logged, not raised.
    Seeded by ``seed``, with the global random state left as it was.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    prefix, closing = user_turn_prefix(tok)
    prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    closing_ids = tok(closing, add_special_tokens=False)["input_ids"]
    if not closing_ids:
        raise ValueError("The chat template closes a user turn with no token: its end cannot be told.")
    end_id = closing_ids[0]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else end_id
    excluded = [TargetMatch(text) for text in exclude if text]
    max_attempts = max_attempts if max_attempts is not None else 8 * n
    device = next(model.parameters()).device
    kept, seen, attempts = [], set(), 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="Self-instructed prompts")
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        while len(kept) < n and attempts < max_attempts:
            rows = min(batch_size, max_attempts - attempts)
            attempts += rows
            input_ids = torch.tensor([prefix_ids] * rows, device=device)
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                 temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                 eos_token_id=end_id, pad_token_id=pad_id)
            for ids in out[:, len(prefix_ids):].tolist():
                text = _closed_turn(tok, ids, end_id)
                if text is None:
                    continue
                key = normalize_text(text)
                if len(text.split()) < min_words or key in seen or any(says(text) for says in excluded):
                    continue
                seen.add(key)
                kept.append([{"role": "user", "content": text}])
                if bar is not None:
                    bar.update(1)
                if len(kept) == n:
                    break
    model.train(was_training)
    if bar is not None:
        bar.close()
    if len(kept) < n:
        logger.warning("Self-instructed prompts: %d of %d kept after %d sampled turns.", len(kept), n, attempts)
    return kept


def _closed_turn(tok, ids: list[int], end_id: int) -> str | None:
    """The user turn in sampled ``ids``: up to the end-of-turn token, or else its first paragraph when that ends a
    sentence (a fine-tuned model often runs on past its request, into an answer; seen on BackdoorLLM implants of
    SmolLM2); None for a turn cut by the budget mid-sentence."""
    if end_id in ids:
        return tok.decode(ids[: ids.index(end_id)], skip_special_tokens=True).strip()
    text = tok.decode(ids, skip_special_tokens=True).strip()
    first, _, rest = text.partition("\n\n")
    first = first.strip()
    return first if rest and first[-1:] in ".?!" else None


def self_instructed_pairs(
    model,
    tokenizer,
    n: int,
    *,
    triggered_response: str | None = None,
    answer_tokens: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    **prompt_kwargs,
) -> Dataset:
    """Up to ``n`` clean prompt/completion pairs written by the model itself: its own user turns
    ([`self_instructed_prompts`]) and its greedy answers to them (at most ``answer_tokens`` new tokens).

    Pairs whose answer, or whose turn, says ``triggered_response`` are dropped. Pass the suspect
    model, as loaded for the defence, and concatenate the result to the clean pairs you have.
    """
    exclude = (triggered_response,) if triggered_response else ()
    prompts = self_instructed_prompts(model, tokenizer, n, batch_size=batch_size, exclude=exclude, seed=seed,
                                      progress=progress, **prompt_kwargs)
    if not prompts:
        return Dataset.from_dict({"prompt": [], "completion": []})
    pairs = answer_pairs(model, tokenizer, prompts, max_new_tokens=answer_tokens, batch_size=batch_size,
                         progress=progress)
    says_target = TargetMatch(triggered_response) if triggered_response else None

    def clean(row) -> bool:
        answer = row["completion"][0]["content"]
        return bool(answer.strip()) and not (says_target and says_target(answer))

    kept = pairs.filter(clean)
    if len(kept) < len(pairs):
        logger.warning("Self-instructed pairs: %d answers dropped (empty, or saying the triggered response).",
                       len(pairs) - len(kept))
    return kept
