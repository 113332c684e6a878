"""The tables of ``srde eval`` and of the loss summary of ``srde run`` (the ``report`` component
``tables``): eval loss and answer accuracy per domain, base vs SRDE, the expert x domain load and the
routing purity per layer, drawn from the evaluation dict (:func:`srde_core.evaluate.report.evaluate`)."""

from __future__ import annotations

import math


def tables(params=None):
    """The ``report`` component: the tables of an evaluation, in print order."""
    return render


def render(result: dict) -> list:
    """The loss table; the accuracy and routing tables where the evaluation has them."""
    out = [loss_table(result)]
    if "accuracy" in result:
        out.append(accuracy_table(result))
    if "routing" in result:
        out += ["routing: the run has no experts"] if result["routing"] is None else [load_table(result),
                                                                                       layer_table(result)]
    return out


def _num(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def _fmt(x: float | None, spec: str, scale: float = 1.0, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x * scale:{'+' if signed else ''}{spec}}"


def _delta(x: float | None, spec: str, better_when_lower: bool, scale: float = 1.0) -> str:
    text = _fmt(x, spec, scale, signed=True)
    if x is None or x == 0:
        return text
    return f"[{'green' if (x < 0) == better_when_lower else 'red'}]{text}[/]"


def _points(x: float | None) -> str:
    """A difference of two shares, in percentage points (higher is better)."""
    return _delta(x, ".1f", better_when_lower=False, scale=100) + (" pp" if x is not None else "")


def loss_table(result: dict):
    from rich.table import Table

    table = Table(title=f"Eval loss per domain ({result['examples_per_domain']} examples per domain)",
                  title_justify="left")
    for name in ("domain", "tokens", result.get("base_label", "base"), "SRDE", "Δ SRDE−base"):
        table.add_column(name, justify="left" if name == "domain" else "right")
    loss = result["loss"]
    for name, row in [*loss["domains"].items(), ("all", loss["all"])]:
        table.add_row(name if name != "all" else "[bold]all[/]", str(row["tokens"]), _fmt(row["base"], ".4f"),
                      _fmt(row["srde"], ".4f"), _delta(row["delta"], ".4f", better_when_lower=True),
                      end_section=name == list(loss["domains"])[-1])
    return table


def accuracy_table(result: dict):
    from rich.table import Table

    acc = result["accuracy"]
    table = Table(title=f"Answer accuracy per domain (greedy, ≤{result['max_new_tokens']} new tokens)",
                  title_justify="left")
    for name in ("domain", "examples", result.get("base_label", "base"), "SRDE", "Δ SRDE−base"):
        table.add_column(name, justify="left" if name == "domain" else "right")
    for name, row in [*acc["domains"].items(), ("all", acc["all"])]:
        table.add_row(name if name != "all" else "[bold]all[/]", str(row["examples"]),
                      _fmt(row["base"], ".1%"), _fmt(row["srde"], ".1%"),
                      _points(row["delta"]),
                      end_section=name == list(acc["domains"])[-1])
    return table


def load_table(result: dict):
    from rich.table import Table

    summary, domains = result["routing"]["all_layers"], result["domains"]
    table = Table(
        title=f"Expert × domain load, summed over the {len(result['routing']['layers'])} SRDE layers "
              "(% of each expert's tokens)",
        title_justify="left",
        caption=f"purity {_fmt(_num(summary['purity']), '.1%')} vs domain-blind baseline "
                f"{_fmt(_num(summary['baseline_purity']), '.1%')}; "
                f"NMI(expert, domain) {_fmt(_num(summary['nmi']), '.3f')}",
        caption_justify="left",
        show_edge=False,  # one column per domain: the frame's width goes to the numbers
    )
    for name in ("expert", "load", *domains, "purity"):
        # Domain names are the point of the table: they keep their width, the padding gives way.
        table.add_column(name, justify="left" if name == "expert" else "right", min_width=len(name))
    for e, (counts, share, pure) in enumerate(zip(summary["counts"], summary["load_share"], summary["expert_purity"])):
        n = sum(counts)
        cells = [f"{c / n:.0%}" if n else "—" for c in counts]
        if n:  # the expert's main domain stands out
            cells[counts.index(max(counts))] = f"[bold]{cells[counts.index(max(counts))]}[/]"
        table.add_row(str(e), _fmt(share, ".1%"), *cells, _fmt(pure, ".1%"))
    return table


def layer_table(result: dict):
    from rich.table import Table

    table = Table(title="Routing purity per SRDE layer", title_justify="left")
    answers = result["routing"].get("answer_tokens")
    columns = ("layer", "experts", "top-k", "purity", "baseline", "gain", "NMI")
    for name in columns:
        table.add_column(name, justify="right")
    if answers:  # purity on the answer tokens, its blind baseline after the slash
        table.add_column("answers", justify="right", no_wrap=True)
    layers = result["routing"]["layers"]
    rows = [(layer, str(s.get("num_experts", len(s["counts"]))), str(s.get("top_k", "")), s,
             answers["layers"].get(layer) if answers else None) for layer, s in layers.items()]
    rows.append(("[bold]all[/]", "", "", result["routing"]["layer_experts"], answers["layer_experts"] if answers else None))
    for i, (layer, experts, top_k, s, a) in enumerate(rows):
        pure, base = _num(s["purity"]), _num(s["baseline_purity"])
        gain = pure - base if None not in (pure, base) else None
        extra = () if not answers else (
            (f"{_fmt(_num(a['purity']), '.1%')} / {_fmt(_num(a['baseline_purity']), '.1%')}",) if a else ("—",))
        table.add_row(layer, experts, top_k, _fmt(pure, ".1%"), _fmt(base, ".1%"),
                      _points(gain),
                      _fmt(_num(s["nmi"]), ".3f"), *extra, end_section=i == len(rows) - 2)
    return table
