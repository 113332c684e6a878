"""Building the run's model from the recipe: the base (HF transformers) and the attached experts."""

from __future__ import annotations

from typing import Any

from srde_core.errors import SRDEError, available, did_you_mean


def _load_kwargs(run) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"attn_implementation": run.recipe.model.attn_implementation}
    owners: dict[str, str] = {}
    for extra in run.hook.srde_model_load_kwargs(recipe=run.recipe):
        for key, value in (extra or {}).items():
            if key in owners and kwargs[key] != value:
                raise SRDEError(f"two plugins set model load argument '{key}' differently", key="model")
            kwargs[key] = value
            owners[key] = "plugin"
    return kwargs


def model_class(architecture: str):
    """The transformers class named by ``model.architecture``."""
    import transformers

    from srde_core.model.architectures import supported_architectures

    cls = getattr(transformers, architecture, None)
    if cls is None or not hasattr(cls, "config_class"):
        names = supported_architectures()
        raise SRDEError(
            f"unknown architecture '{architecture}'{did_you_mean(architecture, names)}; {available(names)}",
            key="model.architecture",
        )
    return cls


def model_location(recipe) -> str:
    """``model.name_or_path`` as ``from_pretrained`` takes it: a relative path that exists next to
    the recipe (like its data and tokenizer files) resolves there; anything else is a hub id or a
    path from the working directory."""
    from pathlib import Path

    name = recipe.model.name_or_path
    local = Path(name).expanduser()
    base = recipe.base_for("model.name_or_path") if hasattr(recipe, "base_for") else getattr(recipe, "base_dir", None)
    if base is not None and not local.is_absolute() and (Path(base) / local).exists():
        return str(Path(base) / local)
    return name


def _from_pretrained(cls, spec, dtype, kwargs, recipe):
    """``cls.from_pretrained``; a model that cannot be loaded ends in one line saying why."""
    source = str(recipe.path)
    try:
        return cls.from_pretrained(model_location(recipe), dtype=dtype, **spec.config, **kwargs)
    except (OSError, ValueError, EnvironmentError, ImportError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())
        if len(reason) > 300:
            reason = reason[:297] + "..."
        raise SRDEError(
            f"cannot load model '{spec.name_or_path}' as {spec.architecture}: {type(err).__name__}: {reason}",
            source=source,
            key="model.name_or_path",
        ) from None


def build_base_model(run):
    """Load (``name_or_path``) or build from ``model.config`` the base model, on the run's device.

    Construction runs inside every context the ``srde_model_init_context`` hook returns (ZeRO-3
    partitions parameters as they are created); without one, the weights are created or loaded
    straight onto the run's device (``device_map``, or a ``torch.device`` context).
    """
    import contextlib

    import torch

    spec = run.recipe.model
    cls = model_class(spec.architecture)
    kwargs = _load_kwargs(run)
    dtype = getattr(torch, spec.dtype)
    contexts = [c for c in run.hook.srde_model_init_context(run=run) if c is not None]
    if not contexts and spec.name_or_path:  # nothing partitions the weights: load them onto the device
        kwargs.setdefault("device_map", str(run.device))
    elif not contexts:
        contexts.append(torch.device(run.device))
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        model = _construct(run, cls, spec, dtype, kwargs)
    model.to(run.device)  # a no-op where the parameters were created there
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        enable_checkpointing(model)
    impl = getattr(model.config, "_attn_implementation", spec.attn_implementation)
    note = " (flash-attn needs CUDA)" if run.device.type == "cpu" and impl == "sdpa" else ""
    run.log(f"attention: {impl}{note}; base parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M")
    return model


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer, with SRDE's forward contexts re-entered in
    the recomputation (:func:`srde_core.model.context.checkpointing_kwargs`)."""
    from srde_core.model.context import checkpointing_kwargs

    model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs())


def _construct(run, cls, spec, dtype, kwargs):
    import torch

    if spec.name_or_path:
        return _from_pretrained(cls, spec, dtype, kwargs, run.recipe)
    else:
        tokenizer = run.tokenizer
        defaults = {
            "vocab_size": tokenizer.vocab_size,
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
        }
        try:
            config = cls.config_class(**{**defaults, **spec.config})
        except (TypeError, ValueError) as err:
            raise SRDEError(f"invalid model config: {err}", source=str(run.recipe.path), key="model.config") from None
        from srde_core.recipe.check import check_vocab_size

        check_vocab_size(int(config.vocab_size), tokenizer.vocab_size, str(run.recipe.path))
        torch.manual_seed(run.recipe.base_model_seed)
        return cls._from_config(config, dtype=dtype, **kwargs)


def attach_recipe_experts(model, recipe, *, gather=None):
    """Freeze ``model`` and attach the experts ``recipe`` describes (its ``[srde]`` table)."""
    from srde_core.model.attach import ComponentSpec, attach_srde

    srde = recipe.srde
    chosen = {"layout": srde.layout, "delta": srde.delta, "router": srde.router, "combine": srde.combine}
    return attach_srde(
        model,
        layout=srde.layout.build(),
        delta_type=srde.delta.build(),
        router_type=srde.router.build(),
        combine_type=srde.combine.build(),
        projections=srde.projections,
        seed=recipe.seed,
        components={kind: ComponentSpec.of(choice.name, choice.params) for kind, choice in chosen.items()},
        gather=gather,
    )


def attach_from_recipe(run):
    """Freeze the run's base model and attach the recipe's experts; then let plugins configure it."""
    experts = attach_recipe_experts(run.model, run.recipe, gather=run.engine.gather if run.engine is not None else None)
    run.experts = experts  # plugins configuring the model see the handle
    experts.context_hook = lambda context, batch, phase: run.hook.srde_forward_context(
        context=context, batch=batch, phase=phase, run=run)
    run.hook.srde_configure_model(model=run.model, run=run)
    count = sum(p.numel() for p in experts.trainable_parameters().values())
    run.log(f"experts: {len(experts.layers)} layers, {count / 1e6:.2f}M trainable parameters")
    return experts
