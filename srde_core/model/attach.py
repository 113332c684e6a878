"""Attaching SRDE layers to a frozen HF causal LM.

:func:`attach_srde` freezes every base parameter, asks the layout which decoder layers get experts
and replaces each chosen layer's MLP by an :class:`SRDEMLP` (its own router and combine step, delta
banks possibly shared with other layers). The returned :class:`SRDEModel` is the handle the rest of
SRDE works through: trainable parameters, routers, the forward context, enabling/disabling the
experts, the adapter state and a JSON description of the structure (stored in adapters and checked
when loading one).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from srde_core.errors import SRDEError
from srde_core.model.architectures import DecoderStack, find_decoder_stack
from srde_core.model.combine import CombineStep, CombineType
from srde_core.model.components import DeltaBank, DeltaType, Gather, LayerPlan, Layout, RemapListener
from srde_core.model.context import ContextSlot, ForwardContext
from srde_core.model.layer import PROJECTIONS, SRDEMLP
from srde_core.model.projections import check_projections
from srde_core.model.routing import Router, RouterType
from srde_core.params import Params, describe_params

#: The keyword arguments through which transformers hands a forward its KV cache.
_CACHE_KWARGS = ("past_key_values", "cache")



@dataclass(frozen=True)
class ComponentSpec:
    """A component as a recipe names it: its registry name and its (JSON-serialisable) params."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, params: Params | Mapping[str, Any] | None = None) -> ComponentSpec:
        """From a validated :class:`Params` object or a plain mapping."""
        if params is None:
            return cls(name)
        if isinstance(params, Params):
            return cls(name, describe_params(params))
        return cls(name, dict(params))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}


class SRDEModel:
    """Handle on a model with SRDE layers attached (built by :func:`attach_srde`).

    ``model`` is the HF model itself, used as usual for forward/generate. The SRDE state (every
    router, combine step and bank, shared banks once) is the module :attr:`adapter`, whose
    ``state_dict()`` keys are ``routers.<layer>.<name>``, ``combines.<layer>.<name>`` and
    ``banks.<bank key>.<projection>.<name>``.
    """

    def __init__(
        self,
        model: nn.Module,
        stack: DecoderStack,
        plans: Sequence[LayerPlan],
        projections: Sequence[str],
        layers: Mapping[int, SRDEMLP],
        banks: Mapping[str, Mapping[str, DeltaBank]],
        components: Mapping[str, ComponentSpec],
        context: ContextSlot,
    ):
        self.model = model
        self.stack = stack
        self.plans: tuple[LayerPlan, ...] = tuple(plans)
        self.projections: tuple[str, ...] = tuple(projections)
        self._layers = dict(layers)
        self._banks = {key: dict(per_proj) for key, per_proj in banks.items()}
        self._components = dict(components)
        self.context = context
        #: ``hook(context, batch, phase)``, called on every context the core builds
        #: (:meth:`make_context`); a run sets it to call the ``srde_forward_context`` hook.
        self.context_hook: Callable[[ForwardContext, Mapping[str, Any], Any], None] | None = None
        self._auto: list[contextlib.AbstractContextManager] = []
        self._hooks = (
            model.register_forward_pre_hook(self._open_for_forward, with_kwargs=True),
            model.register_forward_hook(self._close_for_forward, with_kwargs=True, always_call=True),
        )
        self.adapter = nn.ModuleDict(
            {
                "routers": nn.ModuleDict({str(i): mlp.router for i, mlp in self._layers.items()}),
                "combines": nn.ModuleDict({str(i): mlp.combine for i, mlp in self._layers.items()}),
                "banks": nn.ModuleDict(
                    {key: nn.ModuleDict(per_proj) for key, per_proj in self._banks.items()}
                ),
            }
        )

    @property
    def architecture(self) -> str:
        return self.stack.architecture

    @property
    def layers(self) -> dict[int, SRDEMLP]:
        """Decoder layer index -> its SRDE MLP, in layer order."""
        return dict(self._layers)

    def routers(self) -> dict[int, Router]:
        """Decoder layer index -> its router (for auxiliary losses and routing statistics)."""
        return {i: mlp.router for i, mlp in self._layers.items()}

    def banks(self) -> dict[str, dict[str, DeltaBank]]:
        """Bank key -> projection -> delta bank; a shared bank appears once."""
        return {key: dict(per_proj) for key, per_proj in self._banks.items()}

    @contextlib.contextmanager
    def forward_context(self, context: ForwardContext | None = None) -> Iterator[ForwardContext]:
        """Every SRDE layer sees ``context`` (a fresh one by default) in the forwards run inside;
        their routings are recorded in it."""
        with self.context.using(context if context is not None else ForwardContext()) as active:
            yield active

    def make_context(self, batch: Mapping[str, Any], mode: str, phase: Any = None) -> ForwardContext:
        """The forward context of ``batch`` (:meth:`ForwardContext.from_batch`), extended by
        :attr:`context_hook` (plugins' ``srde_forward_context``), for training, eval and generation
        alike; ``phase`` is the training phase (None outside training)."""
        context = ForwardContext.from_batch(batch, mode)
        if self.context_hook is not None:
            self.context_hook(context, batch, phase)
        return context

    def _open_for_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward of the whole model with no context open (``model.generate``, a plain call)
        gets one built by the core: the ids of the tokens it processes, its attention mask, and the
        mode (``generate`` when the call asks for or carries a KV cache, as ``generate`` does)."""
        if self.context.current is not None:
            self._auto.append(contextlib.nullcontext())
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask")}
        generating = kwargs.get("use_cache") is True or any(kwargs.get(k) is not None for k in _CACHE_KWARGS)
        mode = "generate" if generating else ("train" if module.training else "eval")
        using = self.context.using(self.make_context(batch, mode))
        using.__enter__()
        self._auto.append(using)

    def _close_for_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._auto:
            self._auto.pop().__exit__(None, None, None)

    def step_selectors(self, step: int, total_steps: int, dist: Any) -> None:
        """After optimiser step ``step`` (1-based) of a phase of ``total_steps``: every selector of
        every bank that trains (``bank.selectors()``) gets its ``after_step`` (shared banks once)."""
        for per_proj in self._banks.values():
            for bank in per_proj.values():
                if any(p.requires_grad for p in bank.parameters()):
                    for selector in bank.selectors():
                        selector.after_step(bank, step, total_steps, dist)

    def add_remap_listener(self, listener: RemapListener) -> None:
        """``listener(remaps)`` is called whenever any bank's parameters are remapped."""
        for per_proj in self._banks.values():
            for bank in per_proj.values():
                bank.add_remap_listener(listener)

    def remove_remap_listener(self, listener: RemapListener) -> None:
        for per_proj in self._banks.values():
            for bank in per_proj.values():
                bank.remove_remap_listener(listener)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter of everything training updates: router gates and each bank's
        ``trainable_names``. Shared banks are listed once. Names match adapter keys."""
        return {name: p for name, p in self.adapter.named_parameters() if p.requires_grad}

    def set_enabled(self, enabled: bool) -> None:
        """Switch every expert on or off. Off, the model computes exactly its base function."""
        for mlp in self._layers.values():
            mlp.enabled = enabled

    @property
    def enabled(self) -> bool:
        return all(mlp.enabled for mlp in self._layers.values())

    def resizable_state_keys(self) -> set[str]:
        """Adapter keys whose size may differ from this model's (banks that resize on load)."""
        keys = set()
        for bank_key, per_proj in self._banks.items():
            for proj, bank in per_proj.items():
                keys.update(f"banks.{bank_key}.{proj}.{name}" for name in bank.resizable_state)
        return keys

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every SRDE parameter and buffer (e.g. selected positions), detached, by adapter key."""
        return {name: t.detach() for name, t in self.adapter.state_dict().items()}

    def describe(self) -> dict[str, Any]:
        """The structure as a JSON-serialisable dict: architecture, dimensions, layer plans,
        projections, bank shapes and the components by registry name and params. Two models
        with equal descriptions accept each other's adapters. (Where transformers keeps the
        layers is left out: it moves between releases without changing the structure.)"""
        return {
            "architecture": self.architecture,
            "hidden_size": self.stack.hidden_size,
            "num_layers": self.stack.num_layers,
            "projections": list(self.projections),
            "layers": [
                {"layer": p.layer, "num_experts": p.num_experts, "top_k": p.top_k, "bank": p.bank}
                for p in self.plans
            ],
            "banks": {
                key: {
                    proj: {
                        "type": type(bank).__name__,
                        "num_experts": bank.num_experts,
                        "shape": [bank.out_features, bank.in_features],
                    }
                    for proj, bank in per_proj.items()
                }
                for key, per_proj in self._banks.items()
            },
            "components": {kind: spec.to_json() for kind, spec in self._components.items()},
        }


def _check_plans(plans: Sequence[LayerPlan], num_layers: int) -> list[LayerPlan]:
    plans = list(plans)
    if not plans:
        raise SRDEError("the layout puts experts in no layer", key="layout")
    seen: set[int] = set()
    experts_of_bank: dict[str, int] = {}
    for plan in plans:
        where = f"layer {plan.layer}"
        if not 0 <= plan.layer < num_layers:
            raise SRDEError(f"{where} is out of range (the model has {num_layers})", key="layout")
        if plan.layer in seen:
            raise SRDEError(f"{where} is planned twice", key="layout")
        seen.add(plan.layer)
        if plan.num_experts < 1 or not 1 <= plan.top_k <= plan.num_experts:
            raise SRDEError(
                f"{where}: need 1 <= top_k <= num_experts, got top_k={plan.top_k}, "
                f"num_experts={plan.num_experts}",
                key="layout",
            )
        # Bank keys become module names (and adapter keys), where '.' is the path separator.
        if not plan.bank or "." in plan.bank:
            raise SRDEError(f"{where}: bank key {plan.bank!r} must be non-empty without '.'", key="layout")
        expected = experts_of_bank.setdefault(plan.bank, plan.num_experts)
        if expected != plan.num_experts:
            raise SRDEError(
                f"{where}: shares bank '{plan.bank}' ({expected} experts) but plans {plan.num_experts}",
                key="layout",
            )
    return sorted(plans, key=lambda p: p.layer)


def _check_bank(bank: DeltaBank, weight: torch.Tensor, num_experts: int, where: str) -> None:
    if not isinstance(bank, DeltaBank):
        raise SRDEError(f"{where}: make_bank returned {type(bank).__name__}, not a DeltaBank", key="delta")
    got = (bank.num_experts, bank.out_features, bank.in_features)
    want = (num_experts, *weight.shape)
    if got != want:
        raise SRDEError(
            f"{where}: bank has (experts, out, in) = {got}, expected {want}", key="delta"
        )
    params = dict(bank.named_parameters())
    unknown = [n for n in bank.trainable_names if n not in params]
    if unknown:
        raise SRDEError(f"{where}: trainable_names lists unknown parameters {unknown}", key="delta")
    # trainable_names is the contract: anything else a bank owns is state, not trained.
    for name, p in params.items():
        p.requires_grad_(name in bank.trainable_names)


def _per_layer(module: nn.Module, base_cls: type, where: str) -> nn.Module:
    if not isinstance(module, base_cls):
        raise SRDEError(f"{where}: built {type(module).__name__}, not a {base_cls.__name__}", key="srde")
    return module


def attach_srde(
    model: nn.Module,
    *,
    layout: Layout,
    delta_type: DeltaType,
    router_type: RouterType,
    combine_type: CombineType | None = None,
    projections: Sequence[str] = PROJECTIONS,
    seed: int,
    components: Mapping[str, ComponentSpec] | None = None,
    gather: Gather | None = None,
) -> SRDEModel:
    """Freeze ``model`` and wrap the MLPs the layout chooses with SRDE layers, in place.

    For each :class:`LayerPlan`, the layer's MLP becomes ``SRDEMLP(base_mlp, router, banks,
    combine)`` with one bank per requested projection. Layers with the same bank key share the bank
    modules, built from the first such layer's weights; their weights must have the same shapes
    (every layer hands its banks its own live weight in each forward, see ``BankCall``).
    Routers and combine steps are per layer. They and the banks are float32 (master weights) on the
    base weights' device, drawn from one CPU ``torch.Generator`` seeded with ``seed`` (so the
    result does not depend on the device). ``gather`` makes partitioned base weights readable while
    a bank is built from them and while a bank that reads its layer's weight runs (ZeRO-3); by
    default they are read as they are.

    ``components`` names the components by kind, registry name and params (see
    :class:`ComponentSpec`) for :meth:`SRDEModel.describe`; they must be JSON-serialisable.
    """
    if any(isinstance(m, SRDEMLP) for m in model.modules()):
        raise SRDEError("the model already has SRDE layers attached", key="model")
    components = dict(components or {})
    try:
        json.dumps({kind: spec.to_json() for kind, spec in components.items()})
    except TypeError as err:
        raise ValueError(f"component params must be JSON-serialisable: {err}") from err
    try:
        projections = check_projections(projections)
    except ValueError as err:
        raise SRDEError(str(err), key="srde.projections") from None
    stack = find_decoder_stack(model)
    plans = _check_plans(layout.plan(stack.num_layers), stack.num_layers)
    layer_gather = gather
    gather = gather or (lambda tensors: contextlib.nullcontext())

    # Build every router and bank before touching the model, so a failure leaves it unchanged.
    generator = torch.Generator(device="cpu").manual_seed(seed)
    slot = ContextSlot()
    banks: dict[str, dict[str, DeltaBank]] = {}
    layers: dict[int, SRDEMLP] = {}
    for plan in plans:
        base = stack.mlp(plan.layer)
        weights = {proj: getattr(base, proj).weight for proj in projections}
        device = next(iter(weights.values())).device
        where = f"layer {plan.layer}"
        router = _per_layer(router_type.make_router(stack.hidden_size, plan.num_experts, plan.top_k, generator), Router, f"{where} router")
        router.to(device=device, dtype=torch.float32)
        combine = None
        if combine_type is not None:
            combine = _per_layer(
                combine_type.make_combine(stack.hidden_size, plan.num_experts, plan.top_k, generator), CombineStep, f"{where} combine"
            )
            combine.to(device=device, dtype=torch.float32)
        if plan.bank not in banks:
            built: dict[str, DeltaBank] = {}
            for proj, weight in weights.items():
                with gather([weight]):
                    bank = delta_type.make_bank(weight.detach(), plan.num_experts, generator)
                    _check_bank(bank, weight, plan.num_experts, f"{where} {proj}")
                # .to(dtype) converts floating tensors only: integer positions stay integer.
                built[proj] = bank.to(device=device, dtype=torch.float32)
            banks[plan.bank] = built
        else:
            for proj, weight in weights.items():
                shared = banks[plan.bank][proj]
                with gather([weight]):  # a partitioned weight (ZeRO-3) shows its shape only gathered
                    shape = tuple(weight.shape)
                if (shared.out_features, shared.in_features) != shape:
                    raise SRDEError(
                        f"layer {plan.layer} {proj}: weight {shape} cannot share bank "
                        f"'{plan.bank}' of shape {(shared.out_features, shared.in_features)}",
                        key="layout",
                    )
        layers[plan.layer] = SRDEMLP(base, router, banks[plan.bank], combine, layer=plan.layer, context=slot,
                                     gather=layer_gather)

    for p in model.parameters():
        p.requires_grad_(False)
    for index, mlp in layers.items():
        stack.set_mlp(index, mlp)

    return SRDEModel(model, stack, plans, projections, layers, banks, components, slot)
