"""Domain-labelled data: generated corpora's files, tokenizers, cached tokenisation and batching.

Names are imported on first use, so that importing ``srde_core.data.params`` (the recipe schema)
does not pull in torch or datasets.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "IGNORE_INDEX": "collate",
    "collate": "collate",
    "Corpus": "corpus",
    "find_corpus": "corpus",
    "write_corpus": "corpus",
    "DataBundle": "dataset",
    "encode_example": "dataset",
    "join_prompt_answer": "dataset",
    "load_data": "dataset",
    "Groups": "groups",
    "group_rows": "groups",
    "ColumnsParams": "params",
    "DataParams": "params",
    "GenerateParams": "params",
    "TokenizerParams": "params",
    "resolve_paths": "sources",
    "Tokenizer": "tokenizer",
    "TokenizerKind": "tokenizer",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
