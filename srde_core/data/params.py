"""The ``[tokenizer]`` and ``[data]`` recipe tables. Kept free of torch/datasets imports so that
``srde validate`` stays cheap."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from srde_core.params import Params


class TokenizerParams(Params):
    kind: str = Field("mistral-common", min_length=1, description="a `tokenizer` component: mistral-common (a "
                      "tokenizer file), hf (an HF tokenizer), or a plugin's")
    file: str = Field(
        "mistral_instruct_tokenizer_240323.model.v3",
        description="mistral-common: a path, or the name of a file shipped in mistral_common/data",
    )
    name_or_path: str | None = Field(None, description="hf: hub id or local directory")
    from_model: bool = Field(
        False, description="mistral-common: the model's own tokenizer file (tekken.json of model.name_or_path, "
        "a local checkpoint directory or a hub id) instead of `file`",
    )

    @model_validator(mode="after")
    def _hf_needs_name(self) -> TokenizerParams:
        if self.kind == "hf" and not self.name_or_path:
            raise ValueError("kind 'hf' needs name_or_path")
        if self.from_model and self.kind != "mistral-common":
            raise ValueError("from_model reads a mistral-common tokenizer file; with kind 'hf' set name_or_path")
        return self


class GenerateParams(Params):
    corpus: str = Field(
        "reasoning", min_length=1, description="which generated corpus (a `corpus` component): reasoning (six "
        "domains), conventions (one digit-string prompt under seven conventions), or a plugin's",
    )
    examples_per_domain: int = Field(2000, ge=1, description="training examples per domain")
    eval_per_domain: int = Field(200, ge=1, description="held-out examples per domain")
    validation_per_domain: int = Field(
        0, ge=0, description="held-out validation examples per domain (for choosing settings), disjoint from eval",
    )
    held_out: Literal["eval", "validation"] = Field(
        "eval", description="the held-out split the run evaluates on: eval, or validation (to choose settings)",
    )
    seed: int = Field(0, description="generator seed")

    @model_validator(mode="after")
    def _validation_exists(self) -> GenerateParams:
        if self.held_out == "validation" and not self.validation_per_domain:
            raise ValueError("held_out 'validation' needs validation_per_domain > 0")
        return self


class ColumnsParams(Params):
    prompt: str = "prompt"
    answer: str = "answer"
    domain: str | None = "domain"
    difficulty: str | None = "difficulty"
    text: str | None = Field(None, description="a single text column instead of prompt + answer")


class DataParams(Params):
    format: str = Field("json", min_length=1, description="a `source` component: json, parquet, csv, hf (an HF "
                        "dataset), or a plugin's")
    train_files: list[str] = Field(default_factory=list, description="paths relative to the recipe file")
    eval_files: list[str] = Field(default_factory=list)
    hf_name: str | None = Field(None, description="format 'hf': dataset name on the hub or local path")
    hf_train_split: str = "train"
    hf_eval_split: str = "validation"
    generate: GenerateParams | None = Field(None, description="generate a built-in corpus instead of files")
    columns: ColumnsParams = Field(default_factory=ColumnsParams)
    seq_len: int = Field(128, ge=8, description="tokens per example (longer ones are truncated)")
    loss_on: Literal["all", "answer"] = Field("all", description="labelled tokens: the whole text or the answer")

    @model_validator(mode="after")
    def _has_source(self) -> DataParams:
        if self.hf_name and self.format != "hf":
            raise ValueError(f"hf_name {self.hf_name!r} is read only with format = \"hf\" (format is {self.format!r})")
        if self.generate is None and self.format != "hf" and not self.train_files:
            raise ValueError("set train_files, hf_name (with format = \"hf\") or a [data.generate] table")
        if self.format == "hf" and not self.hf_name and self.generate is None:
            raise ValueError("format 'hf' needs hf_name")
        return self
