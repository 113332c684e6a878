"""The core's own hook implementations (registered first, as the plugin ``srde-core``).

They declare the core's component kinds, with the contract of each, exactly as a plugin declares
its own, and give the run engine a say in how the base model is constructed.
"""

from __future__ import annotations

from srde_core.hookspecs import hookimpl
from srde_core.registry import CALLABLE

#: name -> (summary, contract). The contracts are lazy references: nothing here imports torch.
CORE_KINDS: dict[str, tuple[str, object]] = {
    "selector": ("Which weight positions a sparse expert may change.", "srde_core.model.components:Selector"),
    "delta": ("How an expert changes a weight (sparse, low-rank, ...).", "srde_core.model.components:DeltaType"),
    "layout": ("Which layers get experts, how many, and which share banks.", "srde_core.model.layout:Layout"),
    "router": ("Routes each token to its experts (top-k and gate normalisation).", "srde_core.model.routing:RouterType"),
    "combine": ("How the k expert terms of a token become one (fusion).", "srde_core.model.combine:CombineType"),
    "loss": ("A training loss: LossInputs -> scalar.", CALLABLE),
    "scheduler": ("Learning-rate multiplier per optimiser step.", CALLABLE),
    "schedule": ("A scalar over training (density, temperature, loss weight).", "srde_core.train.schedules:Schedule"),
    "trainer": ("What a phase does: supervised, expert pre-training, RL.", "srde_core.train.trainer:Trainer"),
    "engine": ("Owns backward, optimiser, precision, distribution and checkpoint I/O.", "srde_core.train.engine:Engine"),
    "sampler": ("Which examples make the global batch of each step.", "srde_core.data.sampler:Sampler"),
    "source": ("A data format (data.format): reads and checks a recipe's data.", "srde_core.data.sources:DataFormat"),
    "report": ("Tables of an evaluation (srde eval, a run's loss summary): evaluation -> renderables.", CALLABLE),
    "tokenizer": ("A tokenizer kind (tokenizer.kind): loads the recipe's tokenizer.", "srde_core.data.tokenizer:TokenizerKind"),
    "corpus": ("A generated corpus ([data.generate]): its rows and answer checker.", "srde_core.data.corpus:Corpus"),
}


@hookimpl
def srde_add_kinds(kinds):
    for name, (summary, contract) in CORE_KINDS.items():
        kinds.add(name, summary, contract=contract)


@hookimpl(trylast=True)
def srde_model_init_context(run):
    """The run engine's context for model construction (ZeRO-3 partitions at creation)."""
    return run.engine.model_init_context() if run.engine is not None else None


@hookimpl
def srde_run_header(recipe):
    """A line for each component of the recipe that a plugin put in place of a built-in."""
    from srde_core.plugins import override_lines

    return override_lines(recipe)
