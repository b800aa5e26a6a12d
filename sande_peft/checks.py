"""Checks that run before any training starts, so bad input fails fast and writes nothing.

`transformers.Trainer.__init__` creates `output_dir`, so every check here runs before the
trainers call it.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


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
