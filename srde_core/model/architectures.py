"""Where the decoder layers and their gated MLPs live in each supported HF architecture.

SRDE wraps the gated MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) of each decoder
layer of the *language* model. Multimodal checkpoints (``Mistral3ForConditionalGeneration``, the
class of Ministral-3-14B-Reasoning-2512) also hold a vision tower whose blocks have gated MLPs of
their own; a fixed table of attribute paths, rather than a search for anything that looks like an
MLP, is what keeps those untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from srde_core.errors import SRDEError, available

MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


@dataclass(frozen=True)
class Architecture:
    """Attribute paths of one model class.

    ``layer_paths`` are dotted paths from the model to its decoder ``ModuleList``, tried in order
    (transformers releases have moved the language model of multimodal classes around).
    """

    name: str
    layer_paths: tuple[str, ...]
    mlp_attr: str = "mlp"


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("Ministral3ForCausalLM", ("model.layers",)),
        # transformers 5: model.model.language_model.layers; 4.x: model.language_model.model.layers
        Architecture(
            "Mistral3ForConditionalGeneration",
            ("model.language_model.layers", "language_model.model.layers"),
        ),
        Architecture("MistralForCausalLM", ("model.layers",)),
        Architecture("LlamaForCausalLM", ("model.layers",)),
        Architecture("Qwen2ForCausalLM", ("model.layers",)),
    )
}


def supported_architectures() -> tuple[str, ...]:
    """Names of the model classes SRDE can attach to."""
    return tuple(ARCHITECTURES)


def text_config(config: Any) -> Any:
    """The language model's config: ``config.text_config`` for multimodal configs, else ``config``."""
    get = getattr(config, "get_text_config", None)
    if callable(get):
        return get(decoder=True)
    return getattr(config, "text_config", None) or config


def text_dims(config: Any) -> tuple[int, int]:
    """``(hidden_size, num_hidden_layers)`` of the language model described by ``config``."""
    text = text_config(config)
    return int(text.hidden_size), int(text.num_hidden_layers)


@dataclass(frozen=True)
class DecoderStack:
    """The resolved decoder layers of one model instance."""

    architecture: str
    layers_path: str
    layers: nn.ModuleList
    mlp_attr: str
    hidden_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def mlp(self, index: int) -> nn.Module:
        return getattr(self.layers[index], self.mlp_attr)

    def set_mlp(self, index: int, module: nn.Module) -> None:
        setattr(self.layers[index], self.mlp_attr, module)

    def mlp_path(self, index: int) -> str:
        """Dotted module path of layer ``index``'s MLP, as ``model.named_modules()`` names it."""
        return f"{self.layers_path}.{index}.{self.mlp_attr}"


def _architecture_of(model: nn.Module) -> Architecture:
    # Walk the MRO so a subclass of a supported class is supported too.
    for cls in type(model).__mro__:
        if cls.__name__ in ARCHITECTURES:
            return ARCHITECTURES[cls.__name__]
    raise SRDEError(
        f"unsupported architecture '{type(model).__name__}'; {available(ARCHITECTURES)}",
        key="model.architecture",
    )


def _resolve(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_stack(model: nn.Module) -> DecoderStack:
    """Locate the language model's decoder layers of ``model``.

    Raises :class:`SRDEError` (key ``model.architecture``) for an unsupported class, or when the
    layers or their gated MLPs are not where the table says.
    """
    arch = _architecture_of(model)
    for path in arch.layer_paths:
        layers = _resolve(model, path)
        if isinstance(layers, nn.ModuleList):
            break
    else:
        raise SRDEError(
            f"'{arch.name}': no decoder layers at {' or '.join(arch.layer_paths)}",
            key="model.architecture",
        )
    for index, layer in enumerate(layers):
        mlp = getattr(layer, arch.mlp_attr, None)
        missing = [part for part in MLP_PARTS if not hasattr(mlp, part)]
        if missing:
            raise SRDEError(
                f"'{arch.name}': {path}.{index}.{arch.mlp_attr} is not a gated MLP "
                f"(missing {', '.join(missing)})",
                key="model.architecture",
            )
    hidden_size, _ = text_dims(model.config)
    return DecoderStack(
        architecture=arch.name,
        layers_path=path,
        layers=layers,
        mlp_attr=arch.mlp_attr,
        hidden_size=hidden_size,
    )
