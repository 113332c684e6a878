"""A plugin adds a data format (a `source` component): a run trains on its files, checked by the
core's column mapping; an unknown `data.format` is one line at validate."""

from __future__ import annotations

import json
import re

import pytest

from srde_core.data.sources import DataFormat, check_rows, read_text
from srde_core.testing import plugins_with

OVERRIDES = ["phases.base.steps=1", "phases.experts.steps=1"]


class Tsv(DataFormat):
    """Tab-separated: a header row, then one example a row."""

    name = "tsv"

    def __init__(self):
        self.validated = []

    def rows(self, path):
        header, *lines = read_text(path).splitlines()
        return header.split("\t"), [(i, dict(zip(header.split("\t"), line.split("\t")))) for i, line in enumerate(lines, 1)]

    def validate(self, path, columns):
        self.validated.append(path.name)
        header, rows = self.rows(path)
        return check_rows(str(path), rows, columns, "row", available=header)

    def load(self, path, cmap, hf_cache):
        from datasets import Dataset

        _, rows = self.rows(path)
        return Dataset.from_list([row for _, row in rows])


TSV = Tsv()


@pytest.fixture(scope="module")
def with_tsv():
    return plugins_with("source", "tsv", lambda params: TSV, description="Tab-separated values.")


def _tsv(path, n, start):
    lines = ["question\tanswer\ttopic"] + [f"Q: {i} + 1?\tA: {i + 1}\t{'even' if i % 2 == 0 else 'odd'}"
                                          for i in range(start, start + n)]
    path.write_text("\n".join(lines) + "\n")


def _recipe(tmp_path, micro_recipe):
    text = re.sub(r"\[data\.generate\]\n(.+\n)*", "", micro_recipe.read_text())
    text = text.replace("[data]\n", '[data]\nformat = "tsv"\ntrain_files = ["train.tsv"]\neval_files = ["eval.tsv"]\n'
                        'columns = { prompt = "question", answer = "answer", domain = "topic" }\n', 1)
    _tsv(tmp_path / "train.tsv", 40, 0)
    _tsv(tmp_path / "eval.tsv", 6, 100)
    recipe = tmp_path / "micro.toml"
    recipe.write_text(text)
    return recipe


def test_a_plugin_format_is_read_checked_and_trained_on(tmp_path, micro_recipe, with_tsv):
    from conftest import run_recipe_in

    run = run_recipe_in(tmp_path, _recipe(tmp_path, micro_recipe), with_tsv, OVERRIDES)
    assert TSV.validated[-2:] == ["train.tsv", "eval.tsv"]
    assert len(run.data.train) == 40 and len(run.data.eval) == 6 and run.data.domains == ["even", "odd"]
    assert run.data.train[3]["prompt"] == "Q: 3 + 1?" and run.data.train[3]["answer"] == "A: 4"
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "micro" / "metrics.jsonl").read_text().splitlines()]
    assert {m["phase"] for m in metrics} >= {"base", "experts"}


def test_a_plugin_format_gets_the_cores_column_errors(tmp_path, micro_recipe, with_tsv):
    from conftest import run_recipe_in
    from srde_core.errors import DataError

    recipe = _recipe(tmp_path, micro_recipe)
    (tmp_path / "train.tsv").write_text("question\tanswer\ttopic\nQ: 1?\tA: 2\t \n")
    with pytest.raises(DataError, match=r"train.tsv: row 1: column 'topic' is an empty domain name"):
        run_recipe_in(tmp_path, recipe, with_tsv, OVERRIDES)


def test_an_unknown_format_is_one_line_at_validate(micro_recipe, capsys):
    from srde_core.cli import main

    assert main(["validate", str(micro_recipe), "--set", 'data.format="jsonl"']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "data.format" in err and "unknown data format 'jsonl'" in err and "did you mean 'json'" in err
