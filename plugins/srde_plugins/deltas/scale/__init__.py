"""Scaling experts (`scale`): each expert rescales its layer's own weight, (IA)^3-style.

(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", arXiv:2205.05638) learns vectors that rescale activations element-wise; in the
feed-forward block it rescales the inner activation, the input of the second projection:
``(l_ff * act(W_1 x)) W_2``. As an expert's delta to a projection ``W`` (``(out, in)``) that is
``W_eff = W diag(1 + s_e)``, ``dW_e = W diag(s_e)``: the default (``side = "input"``), applied to
each projection the recipe names (for ``down_proj`` exactly the paper's ``l_ff``). ``side =
"output"`` rescales the projection's output instead, ``dW_e = diag(s_e) W`` (the form of the
paper's ``l_k`` and ``l_v``). The paper starts ``l`` at ones: ``s`` starts at zero, so an untrained
model equals its base. The deltas depend on the layer's live weight, which each layer hands its
banks (``BankCall.weight``), so a bank shared by layers scales each layer's own ``W``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import Params


class ScaleDeltaParams(Params):
    """Arguments of the ``scale`` delta type."""

    side: Literal["input", "output"] = Field(
        "input", description="rescale the projection's input ((IA)^3's l_ff: W diag(1 + s)) or its output (diag(1 + s) W)"
    )


@hookimpl
def srde_register(registry):
    registry.add(
        "delta", "scale", "srde_plugins.deltas.scale.bank:ScaleDelta", ScaleDeltaParams,
        "(IA)^3-style experts: each rescales the layer's own weight by a learned vector (1 + s_e).",
    )
