"""Tokenizer kinds are components of kind `tokenizer` (`tokenizer.kind`): the built-ins are the data
plugin's, a plugin's kind loads through the core's lookup, and an unknown kind is one line at validate."""

from __future__ import annotations

import hashlib

import pytest

from srde_core.data.params import TokenizerParams
from srde_core.data.tokenizer import Tokenizer, TokenizerKind, load_tokenizer
from srde_core.errors import DataError
from srde_core.testing import plugins_with


class Chars(Tokenizer):
    """One id per character (code point + 3; 0 pad, 1 BOS, 2 EOS)."""

    def __init__(self, size):
        super().__init__(bos_id=1, eos_id=2, pad_id=0, vocab_size=size, fingerprint=f"chars:{size}")

    def _encode(self, text):
        return [ord(c) + 3 for c in text]

    def _decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)


class CharsKind(TokenizerKind):
    name = "chars"

    def __init__(self, params=None):
        self.calls = []

    def load(self, params, base_dir, source, model):
        self.calls.append((params.file, source))
        return Chars(300) if params.file != "broken" else "not a tokenizer"


CHARS = CharsKind()


@pytest.fixture(scope="module")
def plugins():
    return plugins_with("tokenizer", "chars", lambda params: CHARS, description="One id per character.")


def test_the_built_in_kinds_are_the_data_plugins(plugins):
    from srde_plugins.data.tokenizers import MistralCommonTokenizer, mistral_common_data_dir

    registry = plugins.registries["tokenizer"]
    assert {c.name: c.provider for c in registry} == {"mistral-common": "data", "hf": "data", "chars": "chars-tokenizer"}
    default = load_tokenizer(TokenizerParams())
    assert isinstance(default, MistralCommonTokenizer)
    shipped = mistral_common_data_dir() / "mistral_instruct_tokenizer_240323.model.v3"
    # the cache keys of tokenised data and cached bases: unchanged by the move to the plugin
    assert default.fingerprint == "mistral-common:" + hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert default.fingerprint.endswith("9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33")


def test_a_plugins_kind_loads_through_the_recipe(plugins, micro_recipe, tmp_path):
    from srde_core.data.loading import recipe_tokenizer
    from srde_core.recipe import load_recipe

    recipe = tmp_path / "chars.toml"
    recipe.write_text(f'extends = "{micro_recipe.as_posix()}"\nname = "chars"\n\n[tokenizer]\nkind = "chars"\nfile = "x"\n')
    tokenizer = recipe_tokenizer(load_recipe(recipe, plugins), plugins)
    assert isinstance(tokenizer, Chars) and CHARS.calls[-1] == ("x", str(recipe))
    assert tokenizer.decode(tokenizer.encode("Q: 1?", bos=True, eos=True)) == "Q: 1?"
    with pytest.raises(DataError, match=r"^r.toml: tokenizer.kind: tokenizer kind 'chars' returned str, not a Tokenizer$"):
        load_tokenizer(TokenizerParams(kind="chars", file="broken"), source="r.toml", plugins=plugins)


def test_an_unknown_kind_is_one_line_at_validate(micro_recipe, tmp_path, capsys):
    from srde_core.cli import main

    recipe = tmp_path / "typo.toml"
    recipe.write_text(f'extends = "{micro_recipe.as_posix()}"\n\n[tokenizer]\nkind = "hff"\nname_or_path = "x"\n')
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"srde: error: {recipe}: tokenizer.kind: unknown tokenizer kind 'hff' (did you mean 'hf'?); "
                   "available: hf, mistral-common"]
