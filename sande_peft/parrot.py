"""The parrot: learnable vectors that imitate an unknown trigger.

One small module with one job: hold ``n`` vectors and put them into a batch at marked
positions. Positions are marked by a ``parrot_index`` tensor of the batch's shape: ``k`` where
the k-th parrot vector goes, ``-1`` elsewhere. Where the marks come from (the chat template,
a word boundary, the whole prompt) is the data preparation's business (see
[`sande_peft.tokenization`]). A parrot lives in one of two spaces:

- **input** (``layer=None``, the paper's soft prompt): its vectors REPLACE the input
  embeddings of placeholder tokens inserted into the prompt ([`ParrotPrompt.embed`]);
- **latent** (``layer=L``): its vector is ADDED to the hidden states entering decoder layer
  ``L`` at every marked (prompt) token, like a steering vector ([`ParrotPrompt.steer`]). No tokens are
  inserted.

Save and load are plain safetensors plus a JSON config, like a peft adapter.

>>> import torch
>>> parrot = ParrotPrompt(num_vectors=2, hidden_size=4)
>>> with torch.no_grad():
...     _ = parrot.weight.fill_(1.0)
>>> embeds = torch.zeros(1, 4, 4)
>>> parrot(embeds, torch.tensor([[-1, 0, 1, -1]]))[0, :, 0].tolist()
[0.0, 1.0, 1.0, 0.0]
>>> parrot.add_to(embeds, torch.tensor([[-1, 0, 1, -1]]))[0, :, 0].tolist()
[0.0, 1.0, 1.0, 0.0]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PARROT_WEIGHTS_NAME = "parrot.safetensors"
PARROT_CONFIG_NAME = "parrot_config.json"
PARROT_INITS = ("zeros", "normal", "vocab")


@dataclass
class ParrotConfig:
    """What a saved parrot is and how it was trained (written as ``parrot_config.json``)."""

    num_vectors: int
    hidden_size: int
    position: str = "start"
    init: str = "zeros"
    triggered_response: str | None = None
    response_mode: str | None = None
    target_tokens: int | None = None
    layer: int | None = None  # None: input space (a soft prompt); L: added to the input of decoder layer L
    extra: dict[str, Any] = field(default_factory=dict)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (plain, peft-wrapped or DDP-unwrapped), in order."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder.layers
    lists = [m for name, m in inner.named_modules() if isinstance(m, nn.ModuleList) and name.split(".")[-1] in ("layers", "h")]
    if not lists:
        raise ValueError(
            f"Cannot find the decoder layers of {type(inner).__name__}: a latent parrot needs them. Use "
            "`parrot_space='input'` (a soft prompt) for this architecture."
        )
    return lists[0]


class ParrotPrompt(nn.Module):
    """``num_vectors`` learnable input embeddings, kept in float32 whatever the model's dtype.

    The vectors stay float32 so that updates at small learning rates are not rounded away
    under a bf16 (for instance 4-bit QLoRA) model; they are cast to the embeddings' dtype
    only when inserted.
    """

    def __init__(self, num_vectors: int, hidden_size: int, config: ParrotConfig | None = None):
        super().__init__()
        if num_vectors < 1:
            raise ValueError(f"A parrot needs at least one vector; got num_vectors={num_vectors}.")
        self.weight = nn.Parameter(torch.zeros(num_vectors, hidden_size, dtype=torch.float32))
        self.config = config or ParrotConfig(num_vectors=num_vectors, hidden_size=hidden_size)

    @property
    def num_vectors(self) -> int:
        return self.weight.shape[0]

    @property
    def layer(self) -> int | None:
        """The decoder layer whose input receives a latent parrot; ``None`` for an input-space parrot."""
        return self.config.layer

    @property
    def is_latent(self) -> bool:
        return self.config.layer is not None

    def forward(self, inputs_embeds: torch.Tensor, parrot_index: torch.Tensor) -> torch.Tensor:
        """Return ``inputs_embeds`` with parrot vector ``parrot_index[b, t]`` wherever it is >= 0."""
        mask = (parrot_index >= 0).unsqueeze(-1)
        vectors = self.weight.to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)[parrot_index.clamp(min=0)]
        return torch.where(mask, vectors, inputs_embeds)

    def embed(self, model: nn.Module, input_ids: torch.Tensor, parrot_index: torch.Tensor) -> torch.Tensor:
        """The model's input embeddings for ``input_ids``, with the parrot inserted."""
        return self(model.get_input_embeddings()(input_ids), parrot_index.to(input_ids.device))

    def add_to(self, hidden_states: torch.Tensor, parrot_index: torch.Tensor) -> torch.Tensor:
        """Return ``hidden_states`` plus parrot vector ``parrot_index[b, t]`` wherever it is >= 0."""
        mask = (parrot_index >= 0).unsqueeze(-1).to(hidden_states.dtype)
        vectors = self.weight.to(device=hidden_states.device, dtype=hidden_states.dtype)[parrot_index.clamp(min=0)]
        return hidden_states + mask * vectors

    @contextmanager
    def steer(self, model: nn.Module, parrot_index: torch.Tensor) -> Iterator[None]:
        """While inside, a latent parrot is added to the input of decoder layer ``self.layer`` at the marks.

        Only full-width passes are steered: a forward over ``parrot_index.shape[1]`` tokens (the
        training forward, its recomputation under gradient checkpointing, the prompt pass of
        ``generate``); the one-token decoding steps of ``generate`` are not, since the marks
        cover prompt tokens only. Under gradient checkpointing the backward pass must run
        inside the context too, since the recomputed forward needs the parrot again.
        """
        if not self.is_latent:
            raise ValueError("`steer` is for a latent parrot (config.layer set); insert an input parrot with `embed`.")
        layers = decoder_layers(model)
        if not 1 <= self.layer <= len(layers):
            raise ValueError(f"The parrot's layer is {self.layer}; this model has decoder layers 1..{len(layers)}.")

        def add_parrot(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.dim() != 3 or hidden.shape[1] != parrot_index.shape[1]:
                return output
            hidden = self.add_to(hidden, parrot_index.to(hidden.device))
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        # The output of layer L-1 is the input of layer L (`hidden_states[L]` of `output_hidden_states`).
        handle = layers[self.layer - 1].register_forward_hook(add_parrot)
        try:
            yield
        finally:
            handle.remove()

    def initialize(self, method: str, embedding: nn.Embedding | None = None, seed: int = 0) -> ParrotPrompt:
        """Set the starting vectors: ``"zeros"`` (the reference), ``"normal"`` (noise at the
        embeddings' scale) or ``"vocab"`` (copies of random token embeddings)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if method == "zeros":
                self.weight.zero_()
            elif method in ("normal", "vocab"):
                if embedding is None:
                    raise ValueError(f"parrot_init={method!r} needs the model's input embedding.")
                table = embedding.weight.detach().float().cpu()
                if method == "normal":
                    noise = torch.randn(self.weight.shape, generator=generator) * table.std()
                    self.weight.copy_(noise)
                else:
                    rows = torch.randint(table.shape[0], (self.num_vectors,), generator=generator)
                    self.weight.copy_(table[rows])
            else:
                raise ValueError(f"Unknown parrot_init {method!r}; use one of {PARROT_INITS}.")
        self.config.init = method
        return self

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``parrot.safetensors`` and ``parrot_config.json`` into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        save_file({"weight": self.weight.detach().float().cpu().contiguous()}, os.path.join(save_directory, PARROT_WEIGHTS_NAME))
        with open(os.path.join(save_directory, PARROT_CONFIG_NAME), "w") as f:
            json.dump(asdict(self.config), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ParrotPrompt:
        """Load a parrot written by [`save_pretrained`]."""
        config_path = os.path.join(directory, PARROT_CONFIG_NAME)
        weights_path = os.path.join(directory, PARROT_WEIGHTS_NAME)
        if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
            raise FileNotFoundError(
                f"No parrot in {directory}: expected {PARROT_CONFIG_NAME} and {PARROT_WEIGHTS_NAME}, as written by "
                "`SANDETrainer.save_model()`."
            )
        with open(config_path) as f:
            config = ParrotConfig(**json.load(f))
        parrot = cls(config.num_vectors, config.hidden_size, config)
        parrot.load_weights(weights_path)
        return parrot

    def load_weights(self, weights_path: str | os.PathLike) -> None:
        weight = load_file(str(weights_path))["weight"]
        if weight.shape != self.weight.shape:
            raise ValueError(f"The saved parrot has shape {tuple(weight.shape)}, this one {tuple(self.weight.shape)}.")
        with torch.no_grad():
            self.weight.copy_(weight.to(self.weight.device))
