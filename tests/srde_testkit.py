"""Test-only SRDE parts: tiny HF models of every supported architecture, a dense delta bank,
a random selector and explicit layouts. Core tests use these so that they do not depend on the
feature plugins (the router is the built-in ``topk``, which every recipe uses by default)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from srde_core.model.components import BankCall, DeltaBank, DeltaType, LayerPlan, Layout, Selector
from srde_plugins.routing import TopKParams
from srde_plugins.routing.topk import TopKRouter, TopKRouterType


def topk_router_type(gate: str = "auto") -> TopKRouterType:
    """The built-in ``topk`` router component, as a recipe's ``router = { name = "topk" }`` builds it."""
    return TopKRouterType(TopKParams(gate=gate))


def make_router(hidden: int, experts: int, top_k: int, seed: int = 0, gate: str = "auto") -> TopKRouter:
    return TopKRouter(hidden, experts, top_k, torch.Generator().manual_seed(seed), gate=gate)

VOCAB = 96
# Token ids the tests feed: below the Mistral3 image token (VOCAB - 1), which expects pixels.
TEXT_TOKENS = VOCAB - 2

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)

ARCHITECTURES = (
    "Ministral3ForCausalLM",
    "Mistral3ForConditionalGeneration",
    "MistralForCausalLM",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
)


def tiny_config(architecture: str, **text_overrides):
    """A random-weights-sized config of ``architecture`` (hidden 32, 3 layers, vocab 96)."""
    import transformers

    text = {**_TEXT, **text_overrides}
    if architecture == "Mistral3ForConditionalGeneration":
        return transformers.Mistral3Config(
            text_config={"model_type": "ministral3", **text},
            vision_config=dict(
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=2,
                head_dim=16,
                image_size=28,
                patch_size=14,
            ),
            image_token_index=VOCAB - 1,
        )
    config_class = {
        "Ministral3ForCausalLM": transformers.Ministral3Config,
        "MistralForCausalLM": transformers.MistralConfig,
        "LlamaForCausalLM": transformers.LlamaConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
    }[architecture]
    return config_class(**text)


def tiny_model(architecture: str, seed: int = 0, **text_overrides) -> nn.Module:
    """A tiny randomly initialised ``architecture`` in eval mode; same seed, same weights."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(tiny_config(architecture, **text_overrides))
    return model.eval()


def input_ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TEXT_TOKENS, (batch, length), generator=generator)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


class MaskedDenseBank(DeltaBank):
    """Per-expert dense delta restricted to ``positions``: ``dW_e = delta_e * mask(positions_e)``.

    Zero-initialised ``delta`` (trainable) and a ``positions`` buffer, so adapter tests see both
    a parameter and a buffer.
    """

    trainable_names = ("delta",)

    def __init__(self, out_features: int, in_features: int, positions: torch.Tensor):
        super().__init__()
        self.num_experts = positions.shape[0]
        self.out_features = out_features
        self.in_features = in_features
        self.delta = nn.Parameter(torch.zeros(self.num_experts, out_features, in_features))
        self.register_buffer("positions", positions)

    def _mask(self) -> torch.Tensor:
        flat = torch.zeros(
            self.num_experts, self.out_features * self.in_features, device=self.delta.device
        )
        flat.scatter_(1, self.positions, 1.0)
        return flat.view_as(self.delta)

    def delta_weight(self, expert: int) -> torch.Tensor:
        return self.delta[expert] * self._mask()[expert]

    def forward(self, x: torch.Tensor, call: BankCall) -> torch.Tensor:
        dense = self.delta * self._mask()
        x = x.to(dense.dtype)
        out = x.new_zeros(x.shape[0], self.out_features)
        groups = call.routing.groups()
        for e in range(self.num_experts):
            tokens, weights = groups.expert(e)
            if tokens.numel():
                out = out.index_add(0, tokens, weights[:, None] * (x[tokens] @ dense[e].T))
        return out


class RandomSelector(Selector):
    """Uniformly random positions per expert, from the generator."""

    def select(self, weight, num_experts, count, generator):
        n = weight.numel()
        rows = [torch.randperm(n, generator=generator)[:count].sort().values for _ in range(num_experts)]
        return torch.stack(rows)


class MaskedDenseDelta(DeltaType):
    """Builds :class:`MaskedDenseBank` s; positions come from ``selector`` (random by default)."""

    def __init__(self, density: float = 0.5, selector: Selector | None = None):
        self.density = density
        self.selector = selector if selector is not None else RandomSelector()

    def make_bank(self, weight, num_experts, generator):
        out_features, in_features = weight.shape
        count = max(1, int(self.density * weight.numel()))
        positions = self.selector.select(weight, num_experts, count, generator)
        return MaskedDenseBank(out_features, in_features, positions)


class PlannedLayout(Layout):
    """Returns the plans it was given (filtered to the model's layers by the attach checks)."""

    def __init__(self, plans: Iterable[LayerPlan]):
        self.plans = list(plans)

    def plan(self, num_layers: int) -> list[LayerPlan]:
        return list(self.plans)


class EveryLayerLayout(Layout):
    """``num_experts``/``top_k`` on ``layers`` (default: all); one bank per layer unless
    ``shared`` maps a bank key to the layers that share it."""

    def __init__(
        self,
        num_experts: int = 4,
        top_k: int = 2,
        layers: Sequence[int] | None = None,
        shared: dict[str, Sequence[int]] | None = None,
    ):
        self.num_experts, self.top_k = num_experts, top_k
        self.layers = layers
        self.shared = shared or {}

    def plan(self, num_layers: int) -> list[LayerPlan]:
        bank_of = {layer: key for key, layers in self.shared.items() for layer in layers}
        chosen = range(num_layers) if self.layers is None else self.layers
        return [
            LayerPlan(layer, self.num_experts, self.top_k, bank_of.get(layer, f"layer{layer}"))
            for layer in chosen
        ]


def perturb(srde_model, seed: int = 1, scale: float = 0.5) -> None:
    """Random values in every trainable SRDE parameter (deltas and router gates)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in srde_model.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def start_torchrun(workdir: Path, recipe: Path, overrides: Sequence[str], port: int, env: Mapping[str, str], *,
                   resume: bool = False) -> subprocess.Popen:
    """Start ``srde run RECIPE`` in 2 processes under torchrun on 127.0.0.1, in a session of its own
    (so a test can kill the whole group), logging to ``workdir/torchrun[-resume].log``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    sets = [a for override in overrides for a in ("--set", override)]
    command = [*launcher, "-m", "srde_core.cli", "run", str(recipe), *sets, *(["--resume"] if resume else [])]
    log = (workdir / f"torchrun{'-resume' if resume else ''}.log").open("w")
    try:
        return subprocess.Popen(command, cwd=workdir, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        log.close()
