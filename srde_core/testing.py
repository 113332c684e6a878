"""A testing kit for plugin authors: the exactness check the built-in components pass, in three lines.

::

    from srde_core.testing import assert_exact
    from my_pkg.delta import MyDelta, MyParams

    def test_my_delta_is_exact():
        assert_exact(MyDelta(MyParams()))

:func:`assert_exact` puts the component (a ``DeltaType``, ``RouterType`` or ``CombineType``, or a
registered name) in a frozen random gated MLP (:class:`GatedMLP`, built by :func:`build_layer`),
draws every trainable tensor at random, and holds the SRDE layer's output and the gradients of its
input and of every trainable tensor to the dense reference
(:func:`srde_core.model.reference.dense_reference`, which materialises ``W + sum_k w_k dW_{e_k}``
per token), in float64. :func:`assert_model_exact` does the same for every SRDE layer of an attached
model in one forward (layers that share banks included).

:func:`plugins_with` loads the installed plugins plus one component registered on the spot (a corpus,
tokenizer, source, report, ...), so a test runs it beside the built-ins. :func:`on_two_ranks` runs a function as two data-parallel ranks in two threads of one process
(:class:`ThreadDist`, whose ``all_sum`` adds what both ranks give): a loss that must be exact under
data parallelism gives the whole batch's value on each half, and the mean of the halves' gradients is
the whole batch's gradient.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from srde_core.model.combine import CombineStep, CombineType
from srde_core.model.components import DeltaType
from srde_core.model.context import ForwardContext
from srde_core.model.layer import PROJECTIONS, SRDEMLP
from srde_core.model.reference import dense_reference
from srde_core.model.routing import RouterType

__all__ = ["GatedMLP", "ThreadDist", "assert_exact", "assert_layer_exact", "assert_model_exact", "build_layer",
           "on_two_ranks", "outputs_and_grads", "plugins_with"]

_KINDS = {"delta": DeltaType, "router": RouterType, "combine": CombineType}


class GatedMLP(nn.Module):
    """The MLP of a Llama/Mistral block: ``down(act(gate(x)) * up(x))``, what an SRDE layer wraps."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _built(kind: str, value: Any, plugins: Any) -> Any:
    """A component of ``kind``: an instance as it is, or built from a registry name / spec table."""
    if isinstance(value, _KINDS[kind]):
        return value
    from srde_core.plugins import load_plugins
    from srde_core.recipe import resolve_component

    return resolve_component(plugins or load_plugins(), kind, value).build()


def build_layer(
    delta: Any = None,
    *,
    router: Any = "topk",
    combine: Any = None,
    hidden: int = 16,
    intermediate: int = 40,
    num_experts: int = 4,
    top_k: int = 2,
    projections: Sequence[str] = PROJECTIONS,
    bias: bool = False,
    trained: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    plugins: Any = None,
) -> SRDEMLP:
    """A frozen random :class:`GatedMLP` wrapped as an SRDE layer with ``delta``, ``router`` and
    ``combine`` (instances of their contracts, or registry names / ``{"name": ..., ...}`` tables;
    ``delta=None``: the sparse delta at density 0.2, ``combine=None``: the weighted sum). ``trained`` draws every trainable tensor (banks, router,
    combine step) from N(0, 0.5) so that the experts differ from the base."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    base = GatedMLP(hidden, intermediate, bias).requires_grad_(False)
    delta_type = _built("delta", delta if delta is not None else {"name": "sparse", "density": 0.2}, plugins)
    banks = {name: delta_type.make_bank(getattr(base, name).weight.detach(), num_experts, generator) for name in projections}
    for bank in banks.values():
        for name, p in bank.named_parameters():
            p.requires_grad_(name in bank.trainable_names)
    router_module = _built("router", router, plugins).make_router(hidden, num_experts, top_k, generator)
    step: CombineStep | None = None
    if combine is not None:
        step = _built("combine", combine, plugins).make_combine(hidden, num_experts, top_k, generator)
    mlp = SRDEMLP(base, router_module, banks, step)
    if trained:
        with torch.no_grad():
            for p in mlp.parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.5, generator=generator)
    return mlp.to(dtype)


def outputs_and_grads(mlp: SRDEMLP, forward: Callable, x: torch.Tensor, context: ForwardContext | None = None):
    """``forward(mlp, x)`` (in ``context``) and the gradients of a fixed random projection of it with
    respect to the input (key ``"input"``) and every trainable tensor (zero where none reaches it)."""
    x = x.detach().clone().requires_grad_(True)
    mlp.zero_grad(set_to_none=True)
    with mlp.context.using(copy.deepcopy(context) if context is not None else ForwardContext()):
        y = forward(mlp, x)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(y.dtype)
    (y * probe).sum().backward()
    grads = {"input": x.grad.clone()}
    for name, p in mlp.named_parameters():
        if p.requires_grad:
            grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
    return y.detach(), grads


def assert_layer_exact(mlp: SRDEMLP, x: torch.Tensor, *, tol: float = 1e-9, context: ForwardContext | None = None) -> dict:
    """``mlp(x)`` equals the dense reference in its output and in the gradients of ``x`` and of
    every trainable tensor, to ``tol`` relative to the largest entry of each; returns the gradients."""
    y, grads = outputs_and_grads(mlp, lambda m, v: m(v), x, context)
    y_ref, grads_ref = outputs_and_grads(mlp, dense_reference, x, context)
    torch.testing.assert_close(y, y_ref.to(y.dtype), rtol=tol, atol=tol * max(y_ref.abs().max().item(), 1e-30),
                               msg=lambda m: f"output: {m}")
    for name, ref in grads_ref.items():
        torch.testing.assert_close(grads[name], ref.to(grads[name].dtype), rtol=tol,
                                   atol=tol * max(ref.abs().max().item(), 1e-30), msg=lambda m, n=name: f"gradient of {n}: {m}")
    return grads


def assert_exact(component: Any, *, tokens: int = 24, tol: float = 1e-9, context: ForwardContext | None = None,
                 **layer: Any) -> SRDEMLP:
    """Build a layer around ``component`` (a ``DeltaType``, ``RouterType`` or ``CombineType``, or a
    delta's registry name) with :func:`build_layer` (``**layer``: its other arguments) and check it
    with :func:`assert_layer_exact` on ``tokens`` random inputs; returns the layer."""
    kind = next((k for k, cls in _KINDS.items() if isinstance(component, cls)), "delta")
    mlp = build_layer(**{kind: component, **layer})
    hidden = mlp.base.gate_proj.in_features
    dtype = mlp.base.gate_proj.weight.dtype
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    assert_layer_exact(mlp, x, tol=tol, context=context)
    return mlp


def assert_model_exact(experts: Any, forward: Callable[[], Any], *, tol: float = 1e-5,
                       gather: Callable[[list[torch.Tensor]], contextlib.AbstractContextManager] | None = None
                       ) -> Mapping[int, float]:
    """Run ``forward()`` (a forward of the attached model ``experts.model``), then hold every SRDE
    layer's output to the dense reference of its input in the context it ran in (its own live
    weights: layers sharing a bank each with theirs). ``gather`` makes a sharded model readable for
    the reference (an engine's ``gather``). Returns each layer's largest relative difference."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor, ForwardContext]] = {}
    hooks = [
        mlp.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(
            i, (args[0].detach().clone(), out.detach().clone(), m.context.current or ForwardContext())))
        for i, mlp in experts.layers.items()
    ]
    try:
        forward()
    finally:
        for hook in hooks:
            hook.remove()
    missing = sorted(set(experts.layers) - set(seen))
    assert not missing, f"layers {missing} did not run"
    worst = {}
    readable = gather(list(experts.model.parameters())) if gather is not None else contextlib.nullcontext()
    with readable, torch.no_grad():
        for i, (x, y, context) in sorted(seen.items()):
            ref = dense_reference(experts.layers[i], x, copy.copy(context)).to(y.dtype)
            scale = max(ref.abs().max().item(), 1e-30)
            worst[i] = (y - ref).abs().max().item() / scale
            assert worst[i] <= tol, f"layer {i}: largest difference {worst[i]:.3g} of the largest entry, over {tol}"
    return worst


class ThreadDist:
    """One of two data-parallel ranks in two threads of one process (the ``Dist`` interface the
    losses use): ``all_sum`` returns what both ranks give, added, without gradient."""

    world_size = 2
    distributed = True

    def __init__(self, rank: int, shared: dict):
        self.rank, self.shared = rank, shared

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        barrier, slots = self.shared["barrier"], self.shared["slots"]
        slots[self.rank] = tensor.detach().clone()
        barrier.wait()
        total = slots[0] + slots[1]
        barrier.wait()
        return total


def on_two_ranks(fn: Callable, halves: Sequence[Sequence[Any]]) -> list:
    """``[fn(ThreadDist(0), *halves[0]), fn(ThreadDist(1), *halves[1])]``, the two calls running at
    once (their collectives meet); an exception in either is raised here."""
    shared = {"barrier": threading.Barrier(2, timeout=60), "slots": [None, None]}
    results: list = [None, None]
    errors: list = []

    def work(rank):
        try:
            results[rank] = fn(ThreadDist(rank, shared), *halves[rank])
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller
            errors.append(error)
            shared["barrier"].abort()

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def plugins_with(kind: str, name: str, factory: Callable, params: Any = None, description: str = "",
                 plugin: str | None = None):
    """The installed plugins plus one component, ``registry.add(kind, name, factory, params,
    description)`` from a plugin named ``plugin`` (default ``NAME-KIND``); raises if any plugin is
    broken. ``params`` defaults to ``NoParams``."""
    import types

    from srde_core.hookspecs import hookimpl
    from srde_core.params import NoParams
    from srde_core.plugins import load_plugins

    @hookimpl
    def srde_register(registry):
        registry.add(kind, name, factory, params or NoParams, description)

    loaded = load_plugins(extra=[(plugin or f"{name}-{kind}", types.SimpleNamespace(srde_register=srde_register))])
    if loaded.broken:
        raise AssertionError(loaded.broken_note())
    return loaded
