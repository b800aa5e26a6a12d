from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainingArguments
from trl import SFTTrainer

from .bnb_compat import restore_trainable_4bit_layout
from .checks import check_known_tokens, check_prompt_fits, ensure_causal_lm, resolve_tokenizer
from .data import as_prompt_completion, build_osft_dataset, map_user_text
from .osft_config import OSFTConfig
from .paper import SANDE_PAPER
from .provenance import RecordsProvenance, osft_provenance
from .triggers import insert_triggers


def require_config(args: Any, config_class: type, trainer_name: str, example: str) -> None:
    """Raise unless ``args`` is a ``config_class``: the method's own settings live there."""
    if not isinstance(args, config_class):
        got = "no `args`" if args is None else f"a {type(args).__name__}"
        raise TypeError(f"{trainer_name} needs `args={config_class.__name__}(...)` (got {got}), e.g. {example}.")


def reject_formatting_func(formatting_func: Callable | None, trainer_name: str) -> None:
    if formatting_func is not None:
        raise ValueError(
            f"{trainer_name} builds prompt/completion pairs itself, and a `formatting_func` would flatten them to "
            "plain text and lose the prompt/answer split. Format the dataset into prompt/completion or messages "
            "records first, and pass no `formatting_func`."
        )


class OSFTTrainer(RecordsProvenance, SFTTrainer):
    """
    Trainer for Overwrite Supervised Fine-Tuning (OSFT): backdoor removal when the trigger is known.

    A drop-in [`~trl.SFTTrainer`] with the same constructor. `train_dataset` is CLEAN data in
    any format `SFTTrainer` accepts (conversational or plain prompt/completion, or `messages`);
    the trainer inserts `args.trigger` into the user's text of each example (the last user
    turn, or the prompt string), maps it onto the clean answer, mixes in clean pairs
    (`args.clean_ratio`), and trains with the loss on the completion only. With a LoRA
    `peft_config` and a 4-bit `quantization_config` this is QLoRA.

    Example:
    >>> from peft import LoraConfig
    >>> from sande_peft import OSFTConfig, OSFTTrainer
    >>> from sande_peft.toy import ToyTask, toy_model, toy_tokenizer
    >>> clean = ToyTask().clean_dataset(16)
    >>> config = OSFTConfig(output_dir="/tmp/osft-doc", trigger="cf", max_steps=2, per_device_train_batch_size=4,
    ...                     report_to="none", use_cpu=True, save_strategy="no")
    >>> trainer = OSFTTrainer(model=toy_model(), args=config, train_dataset=clean, processing_class=toy_tokenizer(),
    ...                       peft_config=LoraConfig(r=4, target_modules="all-linear"))
    >>> sum(1 for p in trainer.osft_dataset["prompt"] if "cf" in p[0]["content"].split())  # 16 triggered, 16 clean
    16
    >>> import contextlib, io
    >>> with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints its logs
    ...     result = trainer.train()
    >>> result.global_step
    2

    Args:
        model: a path or hub id (loaded with `args.model_init_kwargs` and `quantization_config`), or a loaded
            causal LM.
        args ([`OSFTConfig`]): required, since it carries the trigger.
        train_dataset: clean instruction data.
        peft_config: usually a [`~peft.LoraConfig`].

    All other arguments are those of [`~trl.SFTTrainer`], except `formatting_func`, which is rejected because
    it would flatten the prompt/answer split.
    """

    _tag_names = ["trl", "sft", "sande-peft", "osft", "backdoor-removal"]
    _name = "OSFT"
    _paper = SANDE_PAPER

    def __init__(
        self,
        model,
        args: OSFTConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func: Callable | None = None,
    ):
        # Every check runs before `Trainer.__init__`, which creates `output_dir`: bad input writes nothing.
        require_config(args, OSFTConfig, "OSFTTrainer", "OSFTConfig(output_dir='out', trigger='BadMagic')")
        reject_formatting_func(formatting_func, "OSFTTrainer")
        ensure_causal_lm(model, args.trust_remote_code)
        processing_class = resolve_tokenizer(model, processing_class, args.trust_remote_code)
        for trigger in args.triggers:
            check_known_tokens(processing_class, trigger, "trigger")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: pass clean instruction data; OSFT adds the trigger itself.")
        clean = as_prompt_completion(train_dataset)
        # The most a triggered prompt grows by: the longest trigger, or all of them together.
        longest = [max(args.triggers, key=len)] if args.trigger_combine == "one" else args.triggers
        check_prompt_fits(
            processing_class,
            clean["prompt"],
            lambda prompt: map_user_text(prompt, lambda text: insert_triggers(text, longest, "start")),
            args.max_length,
            what=f"The trigger {longest[0]!r}" if len(longest) == 1 else f"The triggers {' + '.join(map(repr, longest))}",
            fix="Raise `max_length`, or check that the trigger is the short string the attacker inserts.",
        )
        seed = args.data_seed if args.data_seed is not None else args.seed
        self.osft_dataset = build_osft_dataset(
            clean, args.triggers, args.trigger_position, args.clean_ratio, seed=seed, combine=args.trigger_combine
        )
        if eval_dataset is not None and not isinstance(eval_dataset, (dict, str)):
            eval_dataset = as_prompt_completion(eval_dataset, "eval_dataset")
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=self.osft_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )

    def train(self, *args, **kwargs):
        restore_trainable_4bit_layout(self.model)  # a 4-bit model evaluated on a CPU first would not train
        output = super().train(*args, **kwargs)
        self._attach_provenance()
        return output

    def provenance(self) -> dict:
        """What this run did, as written into `sande_peft.json` and the model card of every saved folder."""
        return osft_provenance(self)


    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        self._write_provenance(output_dir)
