"""`srde eval RUN_DIR --plots`: PNG figures made from the run's own metrics and routing."""

from __future__ import annotations

import hashlib
import json

from srde_core.cli import main
from srde_plugins.tracking.plots import write_plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_eval_plots_writes_one_figure_per_phase_layer_and_router_load(micro_run, capsys):
    assert main(["eval", str(micro_run), "--plots", "--max-examples", "2"]) == 0
    plots = micro_run / "plots"
    evaluation = json.loads((micro_run / "eval.json").read_text())
    phases = {json.loads(line)["phase"] for line in (micro_run / "metrics.jsonl").read_text().splitlines()}
    expected = {f"training_{p}.png" for p in phases} | {"router_load.png"}
    expected |= {f"routing_layer{layer}.png" for layer in evaluation["routing"]["layers"]}
    assert {p.name for p in plots.iterdir()} == expected
    for path in plots.iterdir():
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    assert "plots: " in capsys.readouterr().out


def test_figures_follow_the_data(tmp_path):
    def digest(losses):
        metrics = [{"phase": "experts", "step": i + 1, "loss": v, "lm": v} for i, v in enumerate(losses)]
        (path,) = write_plots(tmp_path / str(len(losses)) / str(losses[0]), "demo", metrics, None)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest([3.0, 2.0, 1.5]) != digest([3.0, 2.5, 2.4])


def test_density_and_curriculum_figures_appear_when_logged(tmp_path):
    metrics = [{"phase": "experts", "step": s, "loss": 1.0, "density": 0.05 - 0.01 * s, "competence": 0.2 * s} for s in (1, 2, 3)]
    names = {p.name for p in write_plots(tmp_path, "demo", metrics, None)}
    assert {"density.png", "curriculum.png", "training_experts.png"} <= names
