"""The parrot: learnable vectors that imitate an unknown trigger.

One small module with one job: hold ``n`` vectors and put them into a batch at marked
positions. Positions are marked by a ``parrot_index`` tensor of the batch's shape: ``k`` where
the k-th parrot vector goes, ``-1`` elsewhere. Where the marks come from (a word boundary, the
whole prompt) is the data preparation's business (see [`sande_peft.tokenization`]). A parrot
lives in one of two spaces (``ParrotConfig.space``):

- ``"input"`` (the paper's soft prompt, SANDEConfig's default): its vectors REPLACE the input
  embeddings of placeholder tokens inserted into the prompt ([`Parrot.embed`]);
- ``"latent"``: one vector ADDED to the hidden states entering decoder layer ``layer`` at every
  marked (prompt) token, like a steering vector ([`Parrot.steer`]). No tokens are inserted.

Save and load are plain safetensors plus a JSON config, like a peft adapter.

>>> import torch
>>> parrot = Parrot(ParrotConfig(space="input", num_vectors=2, hidden_size=4))
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
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PARROT_WEIGHTS_NAME = "parrot.safetensors"
PARROT_CONFIG_NAME = "parrot_config.json"
PARROT_SPACES = ("latent", "input")


@dataclass
class ParrotConfig:
    """What a saved parrot is and how it was trained (written as ``parrot_config.json``).

    Args:
        space: ``"latent"`` (added to the hidden states entering decoder layer ``layer``) or
            ``"input"`` (a soft prompt in the input embeddings).
        num_vectors: 1 for a latent parrot; the soft prompt's length for an input one.
        hidden_size: the width of each vector.
        layer: latent only, the decoder layer (1-based) whose input receives the vector.
        position: input only, where the soft prompt sits in the user's text (``"start"``,
            ``"end"``, ``"random"``); a latent parrot covers the whole ``"prompt"``.
        triggered_response, response_mode, target_tokens: what it was trained to elicit.
    """

    space: str
    num_vectors: int
    hidden_size: int
    layer: int | None = None
    position: str = "prompt"
    triggered_response: str | None = None
    response_mode: str | None = None
    target_tokens: int | None = None

    def __post_init__(self):
        if self.space not in PARROT_SPACES:
            raise ValueError(f"A parrot's space is 'latent' or 'input', got {self.space!r}.")
        if self.num_vectors < 1:
            raise ValueError(f"A parrot needs at least one vector; got num_vectors={self.num_vectors}.")
        if self.space == "latent" and (self.layer is None or self.layer < 1):
            raise ValueError(f"A latent parrot needs the decoder layer (from 1) it is added to, got {self.layer!r}.")

    @classmethod
    def from_dict(cls, data: dict) -> ParrotConfig:
        """Read a saved config, including those written before `space` was recorded."""
        data = dict(data)
        data.setdefault("space", "latent" if data.get("layer") is not None else "input")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (plain, peft-wrapped or DDP-unwrapped), in order."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder.layers
    # GPT-2 style models keep their blocks in `transformer.h`.
    lists = [m for name, m in inner.named_modules() if isinstance(m, nn.ModuleList) and name.split(".")[-1] in ("layers", "h")]
    if not lists:
        raise ValueError(
            f"Cannot find the decoder layers of {type(inner).__name__}: a latent parrot needs them. Use "
            "`parrot_space='input'` (a soft prompt) for this architecture."
        )
    return lists[0]


def resolve_parrot_layer(model, layer: int | None = None, trust_remote_code: bool = False) -> int:
    """The decoder layer of a latent parrot: ``layer`` checked against the model, or half-way up it when None.

    ``model`` is a loaded model (plain or peft) or a path / hub id, whose config alone is read.

    >>> from sande_peft.toy import toy_model
    >>> resolve_parrot_layer(toy_model(num_layers=4)), resolve_parrot_layer(toy_model(num_layers=4), 4)
    (2, 4)
    """
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    else:
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(config, "num_hidden_layers", None)
    if n_layers is None:
        if layer is None:
            raise ValueError(
                f"Cannot tell how many decoder layers a {type(config).__name__} model has, so the latent parrot has no "
                "default layer: set `parrot_layer`, or use `parrot_space='input'`."
            )
        return layer
    half_way = max(1, n_layers // 2)
    layer = half_way if layer is None else layer
    if not 1 <= layer <= n_layers:
        raise ValueError(
            f"`parrot_layer` is {layer} but the model has {n_layers} decoder layers: use 1 to {n_layers} "
            f"(None: half-way up, layer {half_way})."
        )
    return layer


class Parrot(nn.Module):
    """The parrot's vectors (``config.num_vectors`` of ``config.hidden_size``), kept in float32 whatever the model's dtype.

    The vectors stay float32 so that updates at small learning rates are not rounded away
    under a bf16 (for instance 4-bit QLoRA) model; they are cast to the embeddings' dtype
    only when inserted.
    """

    def __init__(self, config: ParrotConfig):
        super().__init__()
        self.config = config
        # Zeros, as the reference: a latent parrot starts as no steering at all.
        self.weight = nn.Parameter(torch.zeros(config.num_vectors, config.hidden_size, dtype=torch.float32))

    @property
    def num_vectors(self) -> int:
        return self.weight.shape[0]

    @property
    def layer(self) -> int | None:
        """The decoder layer whose input receives a latent parrot; ``None`` for an input-space parrot."""
        return self.config.layer

    @property
    def is_latent(self) -> bool:
        return self.config.space == "latent"

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
    def steer(self, model: nn.Module, parrot_index: torch.Tensor, detach_below: bool = False) -> Iterator[None]:
        """While inside, a latent parrot is added to the input of decoder layer ``self.layer`` at the marks.

        Only full-width passes are steered: a forward over ``parrot_index.shape[1]`` tokens (the
        training forward, its recomputation under gradient checkpointing, the prompt pass of
        ``generate``); the one-token decoding steps of ``generate`` are not, since the marks
        cover prompt tokens only. Under gradient checkpointing the backward pass must run
        inside the context too, since the recomputed forward needs the parrot again.

        ``detach_below``: cut the graph below the parrot. When only the parrot trains, nothing
        below it needs a gradient, yet with gradient checkpointing and an adapter (trl turns on
        the input embeddings' gradient then) the backward pass would run through every lower layer.
        """
        if not self.is_latent:
            raise ValueError("`steer` is for a latent parrot; insert an input-space parrot with `embed`.")
        layers = decoder_layers(model)
        if not 1 <= self.layer <= len(layers):
            raise ValueError(f"The parrot's layer is {self.layer}; this model has decoder layers 1..{len(layers)}.")

        def add_parrot(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.dim() != 3 or hidden.shape[1] != parrot_index.shape[1]:
                return output
            hidden = self.add_to(hidden.detach() if detach_below else hidden, parrot_index.to(hidden.device))
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        # The output of layer L-1 is the input of layer L (`hidden_states[L]` of `output_hidden_states`).
        handle = layers[self.layer - 1].register_forward_hook(add_parrot)
        try:
            yield
        finally:
            handle.remove()

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``parrot.safetensors`` and ``parrot_config.json`` into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        save_file({"weight": self.weight.detach().float().cpu().contiguous()}, os.path.join(save_directory, PARROT_WEIGHTS_NAME))
        with open(os.path.join(save_directory, PARROT_CONFIG_NAME), "w") as f:
            json.dump(asdict(self.config), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Parrot:
        """Load a parrot written by [`save_pretrained`]."""
        config_path = os.path.join(directory, PARROT_CONFIG_NAME)
        weights_path = os.path.join(directory, PARROT_WEIGHTS_NAME)
        if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
            raise FileNotFoundError(
                f"No parrot in {directory}: expected {PARROT_CONFIG_NAME} and {PARROT_WEIGHTS_NAME}, as written by "
                "`SANDETrainer.save_model()`."
            )
        with open(config_path) as f:
            config = ParrotConfig.from_dict(json.load(f))
        parrot = cls(config)
        parrot.load_weights(weights_path)
        return parrot

    def load_weights(self, weights_path: str | os.PathLike) -> None:
        weight = load_file(str(weights_path))["weight"]
        if weight.shape != self.weight.shape:
            raise ValueError(f"The saved parrot has shape {tuple(weight.shape)}, this one {tuple(self.weight.shape)}.")
        with torch.no_grad():
            self.weight.copy_(weight.to(self.weight.device))


def __getattr__(name: str):
    if name == "ParrotPrompt":  # the name before 0.2: by default the parrot is a latent vector, not a prompt
        warnings.warn("`ParrotPrompt` is now `Parrot`; the old name goes in the next release.", FutureWarning, stacklevel=2)
        return Parrot
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
