"""Dynamic sparsity: the number of delta entries a token uses adapts to how hard the input is.

The ``dynamic_sparse`` delta is a ``sparse`` delta at ``max_density`` whose entries are ranked per
expert by priority ``sigmoid(importance) * |value|`` (no gradient; refreshed after every
``refresh_every`` optimiser updates). It has ``levels`` budgets, densities evenly spaced from
``min_density`` to ``max_density``; a token at level ``l`` uses the top ``round(d_l * out * in)``
entries of each of its experts::

    dW_e^(l) = sum over the top-n_l entries j of expert e:  v[e, j] * sigmoid(s[e, j]) at positions[e, j]

Tokens are bucketed by level and each bucket runs the sparse kernel with its own, smaller CSR
structure, so easy tokens cost less. A token's level comes from the forward context's ``budget``
when one is given (the fraction of the bank's entries: the largest level that fits), otherwise
from the bank's difficulty head: ``p = sigmoid(w . x + b)`` on the bank's (detached) input, level
``round(p * (levels - 1))``. The head starts at 0 (``p = 0.5``: the middle level) and is trained by
the ``difficulty`` loss against the data's ``difficulty`` column; it is saved with the adapter.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from srde_core.hookspecs import hookimpl
from srde_core.params import Params, component
from srde_core.registry import ComponentChoice


class DynamicSparseParams(Params):
    """Arguments of the ``dynamic_sparse`` delta type."""

    min_density: float = Field(0.005, gt=0.0, le=1.0, description="density of the lowest budget (easy tokens)")
    max_density: float = Field(
        0.02, gt=0.0, le=1.0, description="density of the highest budget (hard tokens): the entries each expert owns"
    )
    levels: int = Field(3, ge=1, le=64, description="budgets from min_density to max_density, evenly spaced")
    refresh_every: int = Field(
        1, ge=1, description="re-rank the entries by sigmoid(importance) * |value| after this many optimiser updates"
    )
    init_importance: float = Field(0.0, ge=-20.0, le=20.0, description="initial importance logit of every position")
    cache_inputs: bool = Field(True, description="keep each expert's gathered input from forward for backward")
    selector: ComponentChoice = component("selector", "magnitude", "which positions each expert owns")

    @model_validator(mode="after")
    def _ordered(self) -> DynamicSparseParams:
        if self.min_density > self.max_density:
            raise ValueError(f"min_density ({self.min_density}) must not exceed max_density ({self.max_density})")
        return self


class DifficultyLossParams(Params):
    """Arguments of the ``difficulty`` loss."""

    easiest: int = Field(1, ge=1, description="the data's difficulty level that maps to target 0 (lowest budget)")
    hardest: int = Field(3, ge=1, description="the data's difficulty level that maps to target 1 (highest budget)")

    @model_validator(mode="after")
    def _ordered(self) -> DifficultyLossParams:
        if self.hardest <= self.easiest:
            raise ValueError(f"hardest ({self.hardest}) must be greater than easiest ({self.easiest})")
        return self


@hookimpl
def srde_run_header(recipe):
    """The ``difficulty`` loss trains the difficulty heads of ``dynamic_sparse`` banks: with any other
    delta it has nothing to train and would log 0.0 every step, so such a recipe is refused."""
    if any(choice.kind == "delta" and choice.name == "dynamic_sparse" for choice in recipe.srde.delta.nested()):
        return None
    for index, phase in enumerate(recipe.phases):
        if any(loss.name == "difficulty" for loss in phase.losses):
            from srde_core.errors import RecipeError

            raise RecipeError(
                f"loss 'difficulty' trains the difficulty heads of a dynamic_sparse delta, but srde.delta is "
                f"'{recipe.srde.delta.name}' (it would log 0.0 every step); use "
                'srde.delta = { name = "dynamic_sparse", ... } or drop the loss',
                source=str(recipe.path), key=f"phases[{index}].losses",
            )
    return None


@hookimpl
def srde_register(registry):
    here = "srde_plugins.deltas.sparse.dynamic"
    registry.add(
        "delta", "dynamic_sparse", f"{here}.bank:DynamicSparseDelta", DynamicSparseParams,
        "Sparse deltas whose per-token entry budget (min..max density) comes from the context or a difficulty head.",
    )
    registry.add(
        "loss", "difficulty", f"{here}.loss:difficulty", DifficultyLossParams,
        "Binary cross-entropy of the banks' difficulty heads against the data's difficulty column.",
    )
