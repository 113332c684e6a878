"""EleutherAI's lm-evaluation-harness for SRDE runs (``pip install 'srde[lm-eval]'``).

``srde lm-eval RUN_DIR --tasks TASK[,TASK]`` (the command: :mod:`srde_plugins.tracking.commands`)
evaluates a finished run through the harness's Python API, with the experts on or off
(``--no-experts``: the base model). Importing this module also registers the model type ``srde``
with the harness, so from Python::

    import srde_plugins.tracking.harness, lm_eval
    lm_eval.simple_evaluate(model="srde", model_args="run_dir=runs/tiny,experts=false", tasks=["..."])

Two local tasks over the run's own eval rows need no network: ``srde_corpus_gen`` (greedy answer,
exact match) and ``srde_corpus_ll`` (log-likelihood of the answer: accuracy of the greedy answer and
perplexity). Standard tasks (``hellaswag``, ``gsm8k``, ...) work the same where the harness can
download their data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from srde_core.errors import SRDEError, UsageError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - the optional extra is missing
    raise SRDEError("lm-eval is not installed: pip install 'srde[lm-eval]'") from None

LOCAL_TASKS = ("srde_corpus_gen", "srde_corpus_ll")


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() not in ("0", "false", "no", "off")


@register_model("srde")
class SRDELM(TemplateLM):
    """A finished SRDE run as a harness model: ``run_dir``, ``experts`` (on by default), ``batch_size``."""

    def __init__(self, run_dir: str, experts: Any = True, batch_size: Any = 8, device: str | None = None, **_: Any):
        super().__init__()
        from srde_core.api import load

        self.model, self.tok = load(run_dir, device=device)
        self.experts = _flag(experts)
        self.batch_size_per_gpu = int(batch_size)
        self._device = next(self.model.parameters()).device
        config = getattr(self.model.config, "get_text_config", lambda: self.model.config)()
        self.max_length = int(getattr(config, "max_position_embeddings", 2048))

    # -- tokens ---------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # BOS first, as in training; the harness encodes context and context+continuation alike
        return self.tok.encode(string, bos=add_special_tokens is not False, eos=False)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    # -- scoring ----------------------------------------------------------------------------------
    def _state(self):
        from srde_core.api import experts_of
        from srde_core.evaluate import evaluation_state

        return evaluation_state(self.model, experts_of(self.model), enabled=self.experts)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = []
        with self._state():
            for start in range(0, len(requests), self.batch_size_per_gpu):
                chunk = requests[start:start + self.batch_size_per_gpu]
                results.extend(self._score(chunk))
        return results

    def _score(self, chunk) -> list[tuple[float, bool]]:
        sequences, spans = [], []
        for _, context, continuation in chunk:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            inputs = whole[:-1]
            sequences.append(inputs)
            spans.append((len(inputs) - len(continuation), torch.tensor(continuation, dtype=torch.long)))
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        logits = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device)).logits.float()
        out = []
        for row, (first, targets) in enumerate(spans):
            logprobs = F.log_softmax(logits[row, first:first + len(targets)], dim=-1).cpu()
            picked = logprobs.gather(1, targets[:, None]).squeeze(1)
            out.append((float(picked.sum()), bool((logprobs.argmax(-1) == targets).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        scores = []
        for (text,) in [req.args for req in requests]:
            tokens = self.tok_encode(text)[: self.max_length + 1]
            ((value, _),) = self._loglikelihood_tokens([((text, ""), tokens[:1], tokens[1:])])
            scores.append(value)
        return scores

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from srde_core.evaluate.generation import greedy_generate

        outputs = []
        with self._state():
            for context, gen_kwargs in [req.args for req in requests]:
                until = gen_kwargs.get("until", [])
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(gen_kwargs.get("max_gen_toks", 32))
                (ids,) = greedy_generate(self.model, [self.tok_encode(context)], max_new_tokens=max_new,
                                         pad_id=self.tok.pad_id, eos_id=self.tok.eos_id, batch_size=1, device=self._device)
                text = self.tok.decode(ids)
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                outputs.append(text)
        return outputs


def write_local_tasks(run, directory: Path) -> Path:
    """The run's eval rows as JSONL and the two local task YAMLs in ``directory``; returns it."""
    from srde_core.data.dataset import join_prompt_answer

    if run.data.eval is None or len(run.data.eval) == 0:
        raise SRDEError("the run has no eval data for the local tasks", source=str(run.run_dir))
    directory.mkdir(parents=True, exist_ok=True)
    rows = directory / "srde_corpus.jsonl"
    with rows.open("w", encoding="utf-8") as f:
        for row in run.data.eval:
            continuation = join_prompt_answer(row["prompt"], row["answer"])[len(row["prompt"]):]
            f.write(json.dumps({"prompt": row["prompt"], "answer": row["answer"], "continuation": continuation,
                                "domain": row["domain"]}) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(rows.resolve()))}\n"
              "test_split: test\ndoc_to_text: \"{{prompt}}\"\n")
    (directory / "srde_corpus_gen.yaml").write_text(
        "task: srde_corpus_gen\n" + common + "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 16\n  do_sample: false\n"
        "filter_list:\n  - name: strip\n    filter:\n      - function: remove_whitespace\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (directory / "srde_corpus_ll.yaml").write_text(
        "task: srde_corpus_ll\n" + common + "output_type: loglikelihood\ndoc_to_target: \"{{continuation}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
    )
    return directory


def evaluate_with_harness(run_dir: str | Path, tasks: list[str], *, experts: bool = True, limit: int | None = None,
                          batch_size: int = 8, include_path: str | None = None) -> dict:
    """Run the harness on a finished run; return its results dict (``results[task][metric]``)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from srde_core.run import open_finished_run

    if not tasks:
        raise UsageError("--tasks names no task (a comma-separated list, e.g. srde_corpus_gen,srde_corpus_ll)",
                         key="--tasks")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if include_path and not Path(include_path).is_dir():
        raise UsageError(f"--include-path {include_path}: no such directory")
    paths = []
    if any(task in LOCAL_TASKS for task in tasks):
        import io

        from rich.console import Console

        run = open_finished_run(run_dir, Console(file=io.StringIO()), check_data=True)  # the run's own eval rows
        paths.append(str(write_local_tasks(run, Path(run_dir) / "lm_eval")))
    if include_path:
        paths.append(include_path)
    # Indexing the harness's thousands of built-in task files takes seconds: only when asked for.
    only_ours = all(task in LOCAL_TASKS for task in tasks) and not include_path
    manager = TaskManager(include_path=paths or None, include_defaults=not only_ours)
    unknown = [t for t in tasks if t not in manager.all_tasks and t not in LOCAL_TASKS]
    if unknown:
        raise UsageError(f"unknown lm-eval task(s) {', '.join(unknown)}; local tasks: {', '.join(LOCAL_TASKS)}", key="--tasks")
    model = SRDELM(str(run_dir), experts=experts, batch_size=batch_size)
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):  # the harness prints progress notes on stdout
        return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit,
                                       batch_size=batch_size, log_samples=False)
