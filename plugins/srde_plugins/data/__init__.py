"""Generated corpora: `reasoning` (the default) and `conventions` (see :mod:`srde_plugins.data.corpora`).

Data formats (`data.format`): `json` (the default), `csv`, `parquet` (:mod:`srde_plugins.data.formats`) and
`hf` (:mod:`srde_plugins.data.hf`).

Tokenizer kinds (``tokenizer.kind``): ``mistral-common`` (the default) and ``hf``
(:mod:`srde_plugins.data.tokenizers`).

Batch samplers: `shuffled` (a new permutation every epoch; the default), `curriculum` (easy first), `domain_balanced`.

``curriculum`` orders the training examples by their difficulty and lets each step
draw from the easiest fraction ``c(t)`` (its *competence*), which grows from ``initial`` to 1 over
``warmup_epochs`` epochs of the training set: ``linear``, ``exponential`` (geometric), or
``competence`` (Platanios et al. 2019: ``c(t) = min(1, sqrt(t (1 - c0^2) / T + c0^2))``). Every batch
is a pure function of the seed, the phase and the step, so a resumed run draws exactly the same
batches. The difficulty (``difficulty``) is the data's ``difficulty`` column, or each example's mean
per-token loss under the base model (experts off), computed once before the phase and cached by the
data's and the base's fingerprints; ``auto`` takes the column when its values differ, else the loss.

``domain_balanced`` takes the same number of examples from every domain in each batch (Phase 1:
equal examples per expert), drawn from the cached per-domain shards of the tokenised data.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from srde_core.hookspecs import hookimpl
from srde_core.params import NoParams, Params


class CurriculumParams(Params):
    strategy: Literal["linear", "exponential", "competence"] = Field(
        "competence", description="how the competence grows: linear, exponential (geometric) or competence (sqrt)"
    )
    warmup_epochs: float = Field(1.0, gt=0, description="epochs of the training set until every example is eligible")
    initial: float = Field(0.1, gt=0.0, le=1.0, description="competence at step 0: the easiest fraction eligible")
    difficulty: Literal["auto", "column", "base_loss"] = Field(
        "auto", description="what orders the examples: the data's difficulty column, the base model's mean "
        "per-token loss on each (cached), or auto: the column when its values differ, else the base loss"
    )


class ShuffledParams(Params):
    domains: list[str] = Field(
        default_factory=list,
        description="draw only the examples of these domains (e.g. a base pre-trained on a general domain); "
        "empty: every example",
    )


class DomainBalancedParams(Params):
    column: str = Field("domain", min_length=1, description="the column whose values make the groups (the domain)")


@hookimpl
def srde_register(registry):
    registry.add("sampler", "shuffled", "srde_plugins.data.shuffled:ShuffledSampler", ShuffledParams,
                 "Epoch-wise shuffled order: a new seeded permutation of the training set (or of some domains) every epoch.")
    registry.add("sampler", "curriculum", "srde_plugins.data.curriculum:CurriculumSampler", CurriculumParams,
                 "Easy examples first (data difficulty or base-model loss): linear, exponential or competence-based (Platanios 2019).")
    registry.add("sampler", "domain_balanced", "srde_plugins.data.balanced:DomainBalancedSampler", DomainBalancedParams,
                 "Equal examples from every domain in each batch, from the cached per-domain shards (Phase 1).")
    registry.add("corpus", "reasoning", "srde_plugins.data.corpora:reasoning", NoParams,
                 "Six domains with program-checkable answers: math, code, logic, science, planning, patterns.")
    registry.add("corpus", "conventions", "srde_plugins.data.corpora:conventions_corpus", NoParams,
                 "One digit-string prompt under seven conventions (a general domain and six tagged ones).")
    registry.add("tokenizer", "mistral-common", "srde_plugins.data.tokenizers:MistralCommonKind", NoParams,
                 "A tokenizer file read by mistral-common (the shipped v3 by default, a path, a checkpoint, from_model).")
    registry.add("tokenizer", "hf", "srde_plugins.data.tokenizers:HFKind", NoParams,
                 "A transformers AutoTokenizer: a local directory, or a hub id where the network allows.")
    registry.add("source", "json", "srde_plugins.data.formats:JsonFormat", NoParams,
                 "JSON Lines (one object a line) or one JSON array of objects.")
    registry.add("source", "csv", "srde_plugins.data.formats:CsvFormat", NoParams,
                 "CSV with a header row; mapped columns are read as text.")
    registry.add("source", "parquet", "srde_plugins.data.formats:ParquetFormat", NoParams,
                 "A Parquet table; column types checked from its metadata.")
    registry.add("source", "hf", "srde_plugins.data.hf:HFFormat", NoParams,
                 "One split of an HF dataset per role: a save_to_disk directory, a local dataset, or a hub name.")
