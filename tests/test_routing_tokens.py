"""benchmarks/routing_tokens.py on the micro run: purity per layer by token kind, and the probe."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import routing_tokens  # noqa: E402


def test_purity_by_token_kind_and_the_top_k_cap(micro_run, capsys):
    assert routing_tokens.main([str(micro_run), "--max-examples", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d+)\s+4\s+2\s+([\d.]+)\s+\|(.*)$", out, flags=re.M)
    assert rows, out
    for _, cap, cells in rows:
        # 6 domains x 2 picks on 4 experts: at most 4 of 12 slot streams can be pure
        assert float(cap) == round(4 / 12, 3)
        # loss_on = "all": every real token is labelled, so the prompt column has no tokens
        assert cells.split("|")[0].strip() == "— (no tokens)"
        values = [float(v) for pair in re.findall(r"([\d.]+) \(([\d.]+)\)", cells) for v in pair]
        assert len(values) == 4 and all(0.0 <= v <= 1.0 for v in values)
        assert values[:2] == values[2:]  # answer tokens = every real token here
    assert "largest domain" in out


def test_the_probe_reads_the_domain_from_the_base_states(micro_run, capsys):
    assert routing_tokens.main([str(micro_run), "--max-examples", "6", "--threads", "1", "--probe"]) == 0
    out = capsys.readouterr().out
    scores = [float(a) for a in re.findall(r"^layer \d+: accuracy ([\d.]+)", out, flags=re.M)]
    assert scores and all(0.0 <= s <= 1.0 for s in scores)
    # the micro corpus's domains differ in their prompts' words: the states at every token tell them apart
    assert max(scores) > 1 / 6


def test_a_directory_that_is_not_a_run_is_one_error_line(tmp_path, capsys):
    code = routing_tokens.main([str(tmp_path), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "recipe.json" in err
