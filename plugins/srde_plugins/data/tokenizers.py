"""Tokenizer kinds (``tokenizer.kind``): ``mistral-common`` (a tokenizer file read by mistral-common:
the shipped v3 SentencePiece model by default, a path, a checkpoint directory, or the model's own file)
and ``hf`` (a ``transformers.AutoTokenizer``: a local directory, or a hub id where the network allows).

The fingerprints (cache keys of the tokenised data and of cached bases) are ``mistral-common:<sha256 of
the file>`` and ``hf:<sha256 of the serialised tokenizer>``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from srde_core.data.params import TokenizerParams
from srde_core.data.tokenizer import Tokenizer, TokenizerKind
from srde_core.errors import DataError


def mistral_common_data_dir() -> Path:
    """The ``data/`` directory of the installed mistral_common package (its shipped tokenizers)."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data"


class MistralCommonTokenizer(Tokenizer):
    """A tokenizer file read by mistral-common (SentencePiece ``.model.vN`` or Tekken ``.json``)."""

    kind = "mistral-common"

    def __init__(self, path: Path):
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self.path = path
        self._raw = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
        self._ignore_special = SpecialTokenPolicy.IGNORE
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        super().__init__(
            bos_id=self._raw.bos_id,
            eos_id=self._raw.eos_id,
            pad_id=self._raw.pad_id,
            vocab_size=self._raw.n_words,
            fingerprint=f"mistral-common:{digest}",
        )

    def _encode(self, text: str) -> list[int]:
        return self._raw.encode(text, bos=False, eos=False)

    def _decode(self, ids: list[int]) -> str:
        return self._raw.decode(ids, special_token_policy=self._ignore_special)


class HFTokenizer(Tokenizer):
    """A ``transformers.AutoTokenizer`` (local directory, or hub id where the network allows)."""

    kind = "hf"

    def __init__(self, hf_tokenizer):
        self._hf = hf_tokenizer
        eos_id = hf_tokenizer.eos_token_id
        if eos_id is None:
            raise ValueError("the tokenizer defines no end-of-sequence token")
        super().__init__(
            bos_id=hf_tokenizer.bos_token_id,
            eos_id=eos_id,
            pad_id=hf_tokenizer.pad_token_id,
            vocab_size=len(hf_tokenizer),
            fingerprint=f"hf:{_hf_digest(hf_tokenizer)}",
        )

    def _encode(self, text: str) -> list[int]:
        return list(self._hf(text, add_special_tokens=False)["input_ids"])

    def _decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=True)


def _hf_digest(hf_tokenizer) -> str:
    """A hash of everything that decides the ids: the serialised fast tokenizer (vocabulary,
    normaliser, pre-tokeniser, added tokens) or, for slow tokenizers, the vocabulary."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = backend.to_str()
    else:
        content = json.dumps(sorted(hf_tokenizer.get_vocab().items()))
    extra = json.dumps([type(hf_tokenizer).__name__, hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id])
    return hashlib.sha256((content + extra).encode("utf-8")).hexdigest()


#: In a checkpoint directory, the tokenizer files mistral-common reads, in order of preference.
CHECKPOINT_TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v7", "tokenizer.model.v3", "tokenizer.model")


def _resolve_file(file: str, base_dir: Path | None) -> Path | None:
    candidate = Path(file).expanduser()
    if not candidate.is_absolute() and base_dir is not None:
        candidate = base_dir / candidate
    if candidate.is_dir():  # a checkpoint directory: its tekken.json (or SentencePiece model)
        return next((candidate / name for name in CHECKPOINT_TOKENIZER_FILES if (candidate / name).is_file()), None)
    if candidate.is_file():
        return candidate
    shipped = mistral_common_data_dir() / file
    if Path(file).name == file and shipped.is_file():
        return shipped
    return None


def _model_tokenizer_file(model: str | None, source: str | None) -> Path:
    """``from_model``: the tokenizer file of the model at ``model`` (a local checkpoint directory,
    or a hub id: its file from the local HF cache, or downloaded where the network allows)."""
    if not model:
        raise DataError("from_model needs model.name_or_path (a model built from its config has no tokenizer file)",
                        source=source, key="tokenizer.from_model")
    local = Path(model).expanduser()
    if local.is_dir():
        found = _resolve_file(str(local), None)
        if found is None:
            raise DataError(f"'{local}' holds no {' or '.join(CHECKPOINT_TOKENIZER_FILES)}", source=source,
                            key="tokenizer.from_model")
        return found
    from huggingface_hub import hf_hub_download

    from srde_plugins.data.hub import offline_reason

    # The local HF cache first; the network only where it is not switched off (HF_HUB_OFFLINE) and
    # the hub answers, so an offline machine gets its one line at once instead of after retries.
    online = offline_reason() is None
    errors = []
    for local_only in (True, False) if online else (True,):
        for name in CHECKPOINT_TOKENIZER_FILES:
            try:
                return Path(hf_hub_download(model, name, local_files_only=local_only, etag_timeout=5))
            except Exception as err:  # noqa: BLE001 - missing file, no network, unknown repo
                errors.append(_first_line(err))
    where = "in the local HF cache" if not online else "in the local HF cache or on the hub"
    raise DataError(f"no tokenizer file of model '{model}' found {where} ({errors[-1]})",
                    source=source, key="tokenizer.from_model")


class MistralCommonKind(TokenizerKind):
    """``file``: a path (relative to the recipe), the bare name of a file shipped in mistral_common's
    ``data/`` directory, or a checkpoint directory (its ``tekken.json`` or ``tokenizer.model.v*``);
    ``from_model``: the model's own file."""

    name = "mistral-common"

    def __init__(self, params=None):
        pass

    def load(self, params: TokenizerParams, base_dir: Path | None, source: str | None, model: str | None) -> Tokenizer:
        path = _model_tokenizer_file(model, source) if params.from_model else _resolve_file(params.file, base_dir)
        if path is None:
            shipped = ", ".join(sorted(p.name for p in mistral_common_data_dir().iterdir() if p.is_file()))
            raise DataError(
                f"'{params.file}' not found (not a file, nor a directory holding {' or '.join(CHECKPOINT_TOKENIZER_FILES[:2])}, "
                f"nor one shipped with mistral-common: {shipped})",
                source=source,
                key="tokenizer.file",
            )
        try:
            return MistralCommonTokenizer(path)
        except Exception as err:  # noqa: BLE001 - any parse failure is the user's file
            raise DataError(f"{path}: not a mistral-common tokenizer ({_first_line(err)})", source=source,
                            key="tokenizer.file") from err


class HFKind(TokenizerKind):
    """``name_or_path``: a local directory (relative to the recipe) or a hub id."""

    name = "hf"

    def __init__(self, params=None):
        pass

    def load(self, params: TokenizerParams, base_dir: Path | None, source: str | None, model: str | None) -> Tokenizer:
        name = params.name_or_path or ""
        local = Path(name).expanduser()
        if base_dir is not None and not local.is_absolute() and (base_dir / local).exists():
            local = base_dir / local
        offline = None
        if not local.exists():  # a hub id: the local HF cache only where the hub cannot be used
            from srde_plugins.data.hub import offline_reason

            offline = offline_reason()
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(local) if local.exists() else name,
                                               **({"local_files_only": True} if offline else {}))
            return HFTokenizer(hf)
        except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad name/path
            why = f"not in the local HF cache, and the hub cannot be used: {offline}" if offline else _first_line(err)
            raise DataError(f"cannot load '{name}' ({why})", source=source, key="tokenizer.name_or_path") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
