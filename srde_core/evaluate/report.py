"""``srde eval`` and the loss summary of ``srde run``: base vs SRDE per domain, and the routing.

:func:`evaluate` computes everything as a JSON-ready dict; :func:`evaluate_run` opens a finished run,
prints the tables (the ``report`` components; or the JSON) and writes ``eval.json`` into the run directory;
:func:`print_loss_summary` prints the per-domain loss table of a run just finished and writes
``eval_loss.json``. Eval rows are the first ``eval.max_examples_per_domain`` of each domain.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from srde_core.errors import SRDEError, UsageError
from srde_core.evaluate import evaluation_state
from srde_core.evaluate.accuracy import DomainAccuracy, answer_accuracy
from srde_core.evaluate.losses import DomainLoss, domain_losses, eval_batches, eval_subset, overall_loss
from srde_core.evaluate.routing import RoutingCounter

EVAL_FILE, EVAL_LOSS_FILE = "eval.json", "eval_loss.json"


def _num(x: float | None) -> float | None:
    """JSON has no NaN: undefined values (no tokens, no examples) become null."""
    return None if x is None or math.isnan(x) else x


def _eval_rows(run, max_examples: int | None):
    if run.data.eval is None or len(run.data.eval) == 0:
        raise SRDEError("the run has no eval data (set data.eval_files or data.generate)", source=str(run.run_dir))
    per_domain = run.recipe.eval.max_examples_per_domain if max_examples is None else max_examples
    if per_domain < 1:
        raise UsageError(f"--max-examples must be at least 1, got {per_domain}")
    return eval_subset(run.data.eval, run.data.domains, per_domain), per_domain


def _loss_json(base: dict[str, DomainLoss], srde: dict[str, DomainLoss] | None) -> dict:
    def entry(b: DomainLoss, s: DomainLoss | None) -> dict:
        sl = _num(s.loss) if s is not None else None
        bl = _num(b.loss)
        return {"tokens": b.tokens, "base": bl, "srde": sl, "delta": sl - bl if None not in (sl, bl) else None}

    domains = {d: entry(base[d], srde[d] if srde else None) for d in base}
    return {"domains": domains, "all": entry(overall_loss(base), overall_loss(srde) if srde else None)}


def _accuracy_json(base: dict[str, DomainAccuracy], srde: dict[str, DomainAccuracy] | None) -> dict:
    def entry(b: DomainAccuracy, s: DomainAccuracy | None) -> dict:
        sa, ba = (_num(s.accuracy) if s else None), _num(b.accuracy)
        return {"examples": b.examples, "base_correct": b.correct, "srde_correct": s.correct if s else None,
                "base": ba, "srde": sa, "delta": sa - ba if None not in (sa, ba) else None}

    def total(acc: dict[str, DomainAccuracy]) -> DomainAccuracy:
        return DomainAccuracy("all", sum(a.correct for a in acc.values()), sum(a.examples for a in acc.values()))

    domains = {d: entry(base[d], srde[d] if srde else None) for d in base}
    return {"domains": domains, "all": entry(total(base), total(srde) if srde else None)}


def evaluate(run, *, max_examples: int | None = None, losses_only: bool = False, forward=None) -> dict:
    """Evaluate the model of ``run`` (a :class:`RunContext` with model and data) on its eval rows.

    Base = experts disabled, SRDE = experts enabled (``None`` values when the run has no experts).
    Returns ``{"examples_per_domain", "examples", "domains", "has_experts", "max_new_tokens", "loss",
    "accuracy", "routing"}`` (``routing`` is ``None`` without experts; its ``answer_tokens`` holds the
    purity, baseline and NMI per layer counted on the labelled tokens only); ``accuracy`` and ``routing``
    are left out with ``losses_only``. The model's mode and the
    experts' state are as before afterwards. ``forward``: the engine's forward-only runner for the
    loss forwards (see :func:`srde_core.evaluate.losses.domain_losses`)."""
    rows, per_domain = _eval_rows(run, max_examples)
    domains, tokenizer, settings = run.data.domains, run.tokenizer, run.recipe.eval
    batches = eval_batches(rows, pad_id=tokenizer.pad_id, loss_on=run.recipe.data.loss_on, domains=domains,
                           batch_size=settings.batch_size)
    model, experts = run.model, run.experts

    def accuracy() -> dict[str, DomainAccuracy]:
        return answer_accuracy(model, rows, tokenizer, domains, max_new_tokens=settings.max_new_tokens,
                               batch_size=settings.batch_size, device=run.device, corpus=run.data.corpus)

    result: dict = {"examples_per_domain": per_domain, "examples": len(rows), "domains": list(domains),
                    "has_experts": experts is not None, "max_new_tokens": settings.max_new_tokens,
                    "base_label": base_label(run)}
    with evaluation_state(model, experts, enabled=False):
        base_loss = domain_losses(model, batches, domains, device=run.device, forward=forward)
        base_acc = None if losses_only else accuracy()
    srde_loss = srde_acc = counter = None
    if experts is not None:
        counter = RoutingCounter(experts.layers, len(domains))
        answers = RoutingCounter(experts.layers, len(domains), tokens="answer")

        def observe(batch, context):
            counter.observe(batch, context)
            answers.observe(batch, context)

        with evaluation_state(model, experts, enabled=True):
            srde_loss = domain_losses(model, batches, domains, device=run.device, experts=experts,
                                      after_forward=None if losses_only else observe, forward=forward)
            srde_acc = None if losses_only else accuracy()
    result["loss"] = _loss_json(base_loss, srde_loss)
    if losses_only:
        return result
    result["accuracy"] = _accuracy_json(base_acc, srde_acc)
    result["routing"] = None
    if counter is not None:
        result["routing"] = counter.to_json(domains)
        # the same on the labelled (answer) tokens: they follow the prompt, so they can know the domain
        by_answer = answers.to_json(domains)
        statistics = ("purity", "baseline_purity", "nmi", "slots")
        result["routing"]["answer_tokens"] = {
            "layers": {layer: {k: s[k] for k in statistics} for layer, s in by_answer["layers"].items()},
            "layer_experts": by_answer["layer_experts"],
        }
        for plan in experts.plans:
            result["routing"]["layers"][str(plan.layer)].update(num_experts=plan.num_experts, top_k=plan.top_k)
    return result


def base_label(run) -> str:
    """What the "base" column measured: the base model, or where a phase merged trained weights
    into it (the base id ``ID+WHAT``, e.g. ``+peft-lora``), ``base + WHAT merged``."""
    base_id = str(getattr(getattr(run, "base", None), "id", "") or "")
    return f"base + {base_id.split('+', 1)[1]} merged" if "+" in base_id else "base"


def print_tables(run, result: dict, console) -> None:
    """Print what every ``report`` component makes of ``result`` (the built-in ``tables``)."""
    from srde_core.params import NoParams

    for component in run.plugins.registries["report"]:
        for renderable in component.build(NoParams())(result):
            console.print(renderable)


# ---- entry points -------------------------------------------------------------------------------

def print_loss_summary(run, forward=None) -> dict | None:
    """Print the per-domain eval loss, base vs SRDE, of a run just finished and write it to
    ``eval_loss.json`` in the run directory (the main process; another process called here takes
    part in the forwards, where the engine's are collective, and prints nothing). Returns the loss
    dict; ``None`` (with a note) when the run has no eval data. ``forward``: the engine's
    forward-only runner (:meth:`Engine.forward_only`)."""
    from srde_core.run import write_json_atomic

    if run.data is None or run.data.eval is None or len(run.data.eval) == 0:
        run.log("eval: no eval data; loss summary skipped")
        return None
    result = evaluate(run, losses_only=True, forward=forward)
    if run.dist.is_main:
        print_tables(run, result, run.console)
        write_json_atomic(Path(run.run_dir) / EVAL_LOSS_FILE, result)
    return result


def evaluate_run(run_dir: str | Path, console, max_examples: int | None = None, as_json: bool = False) -> dict:
    """Open the finished run in ``run_dir``, evaluate it (:func:`evaluate`), write ``eval.json``
    there and print the tables to ``console`` (or, with ``as_json``, the JSON alone to its file;
    loading messages then go to stderr). Raises ``SRDEError`` for a directory that is not a
    finished run."""
    from rich.console import Console

    from srde_core.run import open_finished_run, write_json_atomic

    log_console = Console(stderr=True, highlight=False) if as_json else console
    run = open_finished_run(run_dir, log_console, check_data=True)
    result = {"run_dir": str(run.run_dir), **evaluate(run, max_examples=max_examples)}
    write_json_atomic(Path(run.run_dir) / EVAL_FILE, result)
    if as_json:
        console.file.write(json.dumps(result, indent=2) + "\n")
        console.file.flush()
        return result
    print_tables(run, result, console)
    console.print(f"written: {Path(run.run_dir) / EVAL_FILE}", highlight=False, markup=False)
    return result
