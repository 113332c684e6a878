"""One tokenizer interface (:class:`Tokenizer`); the kinds that load one are components of kind
``tokenizer`` (:class:`TokenizerKind`, named by ``tokenizer.kind``).

The default kind ``mistral-common`` reads the 32k SentencePiece v3 tokenizer that the ``mistral-common``
package ships (``mistral_instruct_tokenizer_240323.model.v3``), so tiny runs need no download; real runs
may name any ``transformers`` tokenizer (``kind = "hf"``). Both are the data plugin's
(:mod:`srde_plugins.data.tokenizers`).

Padding: neither the v3 tokenizer nor many HF tokenizers define a pad token. Where none is defined,
``pad_id`` is the end-of-sequence id; padded positions are always masked (attention mask 0, label
-100), so the choice never reaches the loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from srde_core.data.params import TokenizerParams
from srde_core.errors import DataError

__all__ = ["Tokenizer", "TokenizerKind", "TokenizerParams", "find_tokenizer_kind", "load_tokenizer"]


class Tokenizer:
    """Text <-> token ids, with the special ids and a stable ``fingerprint`` for cache keys.

    Construct with :func:`load_tokenizer`. ``encode`` never adds special tokens except the BOS/EOS
    asked for; ``decode`` drops special tokens.
    """

    kind: str = ""

    def __init__(self, *, bos_id: int | None, eos_id: int, pad_id: int | None, vocab_size: int, fingerprint: str):
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = eos_id if pad_id is None or pad_id < 0 else pad_id
        self.vocab_size = vocab_size
        self.fingerprint = fingerprint

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of ``text``, with BOS first / EOS last when asked (BOS only if one exists)."""
        ids = self._encode(text)
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids) -> str:
        """The text of ``ids`` (a list or a 1-D tensor), special tokens dropped."""
        return self._decode([int(i) for i in ids])

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        kind, _, digest = self.fingerprint.partition(":")
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={kind}:{digest[:12]})"


class TokenizerKind:
    """A kind of tokenizer (component kind ``tokenizer``, named by ``tokenizer.kind``).

    :meth:`load` returns the :class:`Tokenizer` of a recipe's ``[tokenizer]`` table; a problem is one
    :class:`DataError` naming ``source`` (the recipe file) and the key. The built-ins ``mistral-common``
    and ``hf`` are the data plugin's (``srde_plugins/data/tokenizers.py``).
    """

    #: the registered name (``tokenizer.kind``)
    name: str = ""

    def load(self, params: TokenizerParams, base_dir: Path | None, source: str | None, model: str | None) -> Tokenizer:
        """The tokenizer ``params`` names; relative paths are relative to ``base_dir``; ``model``:
        where the model is (for a kind that reads the model's own tokenizer)."""
        raise NotImplementedError


def find_tokenizer_kind(name: str | TokenizerKind, plugins: Any = None) -> TokenizerKind:
    """The tokenizer kind ``name`` (a registered ``tokenizer`` component), or ``name`` itself."""
    if isinstance(name, TokenizerKind):
        return name
    from srde_core.plugins import load_plugins
    from srde_core.recipe.resolve import resolve_component

    return resolve_component(plugins if plugins is not None else load_plugins(), "tokenizer", name).build()


def load_tokenizer(
    params: TokenizerParams, base_dir: str | Path | None = None, *, source: str | None = None,
    model: str | None = None, plugins: Any = None,
) -> Tokenizer:
    """The tokenizer a recipe's ``[tokenizer]`` table names, loaded by its kind (``tokenizer.kind``).

    ``file`` (kind ``mistral-common``) is a path, relative to ``base_dir`` (the recipe's directory)
    when given, or the bare name of a file shipped in mistral_common's ``data/`` directory; a
    directory (a downloaded checkpoint) means its ``tekken.json`` (or ``tokenizer.model.v*``).
    ``name_or_path`` (kind ``hf``) is a local directory or a hub id. Failures raise
    :class:`DataError` naming ``source`` (the recipe file) and the key. ``plugins``: where the kind
    is looked up (default: the installed plugins).
    """
    base = Path(base_dir) if base_dir is not None else None
    tokenizer = find_tokenizer_kind(params.kind, plugins).load(params, base, source, model)
    if not isinstance(tokenizer, Tokenizer):
        raise DataError(f"tokenizer kind '{params.kind}' returned {type(tokenizer).__name__}, not a Tokenizer",
                        source=source, key="tokenizer.kind")
    return tokenizer
