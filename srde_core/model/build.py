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


def _from_pretrained(cls, spec, dtype, kwargs, source: str):
    """``cls.from_pretrained``; a model that cannot be loaded ends in one line saying why."""
    try:
        return cls.from_pretrained(spec.name_or_path, dtype=dtype, **spec.config, **kwargs)
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
    partitions parameters as they are created).
    """
    import contextlib

    import torch

    spec = run.recipe.model
    cls = model_class(spec.architecture)
    kwargs = _load_kwargs(run)
    dtype = getattr(torch, spec.dtype)
    with contextlib.ExitStack() as stack:
        for context in run.hook.srde_model_init_context(run=run):
            if context is not None:
                stack.enter_context(context)
        model = _construct(run, cls, spec, dtype, kwargs)
    model.to(run.device)
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    impl = getattr(model.config, "_attn_implementation", spec.attn_implementation)
    note = " (flash-attn needs CUDA)" if run.device.type == "cpu" and impl == "sdpa" else ""
    run.log(f"attention: {impl}{note}; base parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M")
    return model


def _construct(run, cls, spec, dtype, kwargs):
    import torch

    if spec.name_or_path:
        return _from_pretrained(cls, spec, dtype, kwargs, str(run.recipe.path))
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
        torch.manual_seed(run.recipe.seed)
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
    run.hook.srde_configure_model(model=run.model, run=run)
    count = sum(p.numel() for p in experts.trainable_parameters().values())
    run.log(f"experts: {len(experts.layers)} layers, {count / 1e6:.2f}M trainable parameters")
    return experts
