"""Evaluating a run: per-domain loss and answer accuracy (base vs SRDE) and routing analysis.

    losses      token-weighted next-token NLL per domain: the training LM loss, on eval rows
    accuracy    greedy answers per domain, checked by the corpus checkers (first-line match otherwise)
    routing     expert x domain load of every SRDE layer, purity and NMI vs a domain-blind router
    generation  batched greedy decoding with left padding; ``srde generate``
    report      rich tables and JSON for ``srde eval``; the loss summary at the end of ``srde run``

Every function that runs the model does so inside :func:`evaluation_state`, which puts back the
train/eval mode and the experts' on/off state it found.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def evaluation_state(model, experts=None, *, enabled: bool = True) -> Iterator[None]:
    """Inside the block: ``model`` in eval mode, no gradients, and the experts of ``experts`` (an
    ``SRDEModel`` handle or ``None``) switched on or off per ``enabled``. On exit, every module's
    train/eval mode and every SRDE layer's on/off state is what it was before, even on errors.

    Compiled layers run eagerly inside (``torch.compiler.set_stance("force_eager")``): a few
    forwards between training steps (a warm start, an eval, generation) in another grad mode and
    at other shapes would each compile the layers again, for every layer, and fill dynamo's
    recompile budget that the training steps need."""
    import torch

    # Per module and per layer: a caller may have set parts differently (e.g. a frozen base in
    # eval mode under a training adapter), and a blanket model.train(x) would not give that back.
    modes = [(module, module.training) for module in model.modules()]
    layers = list(experts.layers.values()) if experts is not None else []
    switches = [(mlp, mlp.enabled) for mlp in layers]
    try:
        model.eval()
        if experts is not None:
            experts.set_enabled(enabled)
        # no_grad, not inference_mode: tensors a layer caches while evaluating must stay usable
        # by autograd if training continues afterwards.
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        for module, training in modes:
            module.training = training
        for mlp, was_enabled in switches:
            mlp.enabled = was_enabled
