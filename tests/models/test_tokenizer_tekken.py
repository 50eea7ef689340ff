"""The Tekken tokenizer beyond the shipped files (those are in test_tokenizer_exact.py): files that
list their special tokens (tokenizer v7, as hub repos ship them), the v7 chat format on Tekken,
saving and loading, and the chat-format checks.  Small Tekken files keep these fast."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MCTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from mistral_tune.models.presets import PRESETS
from mistral_tune.models.sources import ModelSource
from mistral_tune.models.tokenizer import SIDECAR_FILE, MistralTokenizer, load_tokenizer, tokenizer_file
from tests.helpers import mc_chat_ids, tiny_tekken_file

V7_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"]
V7_SPECIALS += ["[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]"]
V7_SPECIALS += ["[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]

TEXTS = ["hello world", "  hello\n\nworld wor", "héllo 🤖 日本", "", " ", "[INST] </s> <s> literal", "a\r\n\tb  "]

CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "hello"}],
    [
        {"role": "system", "content": "sys\n\n"},
        {"role": "user", "content": " hello"},
        {"role": "assistant", "content": "world  "},
        {"role": "user", "content": "héllo 🤖"},
    ],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "hello world"}],
]


@pytest.fixture(scope="module")
def v7_file(tmp_path_factory):
    return tiny_tekken_file(tmp_path_factory.mktemp("v7") / "tekken.json", V7_SPECIALS, version="v7")


def test_listed_special_tokens_and_v7_format(v7_file):
    tok = MistralTokenizer(v7_file)  # "auto": a Tekken v7 file takes the v7 format
    reference = Tekkenizer.from_file(v7_file)
    assert tok.chat_template == "v7" and tok.kind == "tekken"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocabulary_size) == (1, 2, 11, reference.n_words)
    assert tok.id_to_piece(23) == "<SPECIAL_23>" == reference.id_to_piece(23)
    for text in TEXTS:
        assert tok.encode(text, add_eos=True) == reference.encode(text, bos=True, eos=True), text
        assert tok.decode(tok.encode(text)) == text
    mc = MCTokenizer.from_file(str(v7_file))  # mistral-common's v7 instruct encoder, from the file's version
    hf = tok.to_hf()
    for messages in CONVERSATIONS:
        ids = tok.encode_chat(messages)[0]
        assert ids == mc_chat_ids(mc, messages), messages
        assert hf.apply_chat_template(messages, return_dict=False) == ids, messages
    assert tok.decode(tok.encode_chat(CONVERSATIONS[1])[0], skip_special_tokens=False) == (
        "<s>[SYSTEM_PROMPT]be brief[/SYSTEM_PROMPT][INST]hello world[/INST]"
    )


def test_tekken_format_on_default_special_tokens(tmp_path):
    path = tiny_tekken_file(tmp_path / "tekken_tiny.json")
    tok, reference = MistralTokenizer(path), Tekkenizer.from_file(path)
    assert tok.chat_template == "tekken"
    mc = MCTokenizer.from_file(str(path))
    assert tok.encode("héllo 🤖 日本") == reference.encode("héllo 🤖 日本", bos=True, eos=False)
    for messages in CONVERSATIONS:
        assert tok.encode_chat(messages)[0] == mc_chat_ids(mc, messages), messages
    # v3's system prompt goes into the last user turn, with no SentencePiece dummy-prefix spaces.
    assert tok.decode(tok.encode_chat(CONVERSATIONS[3])[0], skip_special_tokens=False) == (
        "<s>[INST] hello[/INST]world</s>[INST]sys\n\n\n\nhéllo 🤖[/INST]"
    )


def test_literal_special_strings(tmp_path):
    tok = MistralTokenizer(tiny_tekken_file(tmp_path / "tekken_tiny.json"))
    hf = tok.to_hf()
    text = "x <s> [INST] </s> y"
    assert tok.encode(text) == Tekkenizer.from_file(tmp_path / "tekken_tiny.json").encode(text, True, False)
    assert hf(text, split_special_tokens=True)["input_ids"] == tok.encode(text)
    assert hf(text)["input_ids"] != tok.encode(text)  # the documented gap of every HF tokenizer


def test_unknown_tekken_version_needs_an_explicit_format(tmp_path):
    path = tiny_tekken_file(tmp_path / "tekken.json", V7_SPECIALS, version="v11")
    with pytest.raises(ValueError, match="pass chat_template= explicitly"):
        MistralTokenizer(path)
    assert MistralTokenizer(path, chat_template="v7").chat_format == "v7"


@pytest.mark.parametrize(
    "version, template, match",
    [
        ("tekken_240718", "v3", "not defined on a tekken tokenizer; use one of \\['tekken', 'v7'\\]"),
        ("tekken_240718", "v1", "not defined on a tekken tokenizer"),
        ("v3", "tekken", "not defined on a sentencepiece tokenizer"),
        ("v3", "v7", "needs the control tokens \\['\\[SYSTEM_PROMPT\\]', '\\[/SYSTEM_PROMPT\\]'\\]"),
        ("v1", "v3", "needs the control tokens"),
        ("v7", "chatml", "unknown chat_template"),
    ],
)
def test_format_must_fit_the_file(version, template, match):
    with pytest.raises(ValueError, match=match):
        MistralTokenizer.from_version(version, chat_template=template)


def test_save_and_load(tmp_path):
    from transformers import AutoTokenizer, MistralConfig, PreTrainedTokenizerFast

    source = tiny_tekken_file(tmp_path / "tekken_tiny.json")
    tok = MistralTokenizer(source, chat_template="tekken")
    out = tmp_path / "saved"
    tok.save_pretrained(out)
    assert (out / "mistral_tune_tekken.json").read_bytes() == source.read_bytes()
    assert not (out / "tekken.json").exists() and not (out / "tokenizer.model").exists()
    sidecar = json.loads((out / SIDECAR_FILE).read_text())
    assert sidecar == {"chat_template": "tekken", "tokenizer_file": "mistral_tune_tekken.json"}
    # Plain transformers loads the exported tokenizer.json, also beside a Mistral config.json (as in a
    # merged export), where a file named tekken.json would select its mistral-common backend instead.
    MistralConfig().save_pretrained(out)
    hf = AutoTokenizer.from_pretrained(str(out))
    assert isinstance(hf, PreTrainedTokenizerFast)
    assert hf.pad_token == "<pad>" and hf.pad_token_id == 11 != hf.eos_token_id
    for text in TEXTS[:5]:
        assert hf(text)["input_ids"] == tok.encode(text)
    for messages in CONVERSATIONS:
        assert hf.apply_chat_template(messages, return_dict=False) == tok.encode_chat(messages)[0]
    again = MistralTokenizer.from_pretrained(out)
    assert again.chat_template == "tekken" and again.model_file == out / "mistral_tune_tekken.json"
    assert again.encode("hello world") == tok.encode("hello world")


def test_hub_layout_and_preset_chat_template(tmp_path):
    """A hub repo's tekken.json (no sidecar): found, chat format from the preset, else from the file."""
    tiny_tekken_file(tmp_path / "tekken.json")
    assert MistralTokenizer.from_pretrained(tmp_path).chat_template == "tekken"
    assert load_tokenizer(ModelSource(None, tmp_path, None)).chat_template == "tekken"
    preset = replace(PRESETS["mistral_tiny"], tokenizer="tekken_240718", chat_template="v7")
    chosen = load_tokenizer(ModelSource(preset, tmp_path, None))  # no sidecar: the preset's format
    assert chosen.chat_template == "v7" and chosen.model_file == tmp_path / "tekken.json"
    # Without a directory, a preset's tokenizer is mistral-common's file.
    offline = load_tokenizer(ModelSource(preset, None, None))
    assert offline.model_file == tokenizer_file("tekken_240718") and offline.chat_template == "v7"


def test_export_files_reload(tmp_path):
    """The export writes a Tekken tokenizer that our loader and plain transformers both read back."""
    from transformers import AutoTokenizer

    from mistral_tune.export.hf_files import write_tokenizer_files

    tok = MistralTokenizer(tiny_tekken_file(tmp_path / "tekken_tiny.json", V7_SPECIALS, version="v7"))
    write_tokenizer_files(tok, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tok.jinja_chat_template
    again = load_tokenizer(ModelSource(None, tmp_path / "merged", None))
    assert (again.kind, again.chat_template) == ("tekken", "v7")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    for messages in CONVERSATIONS:
        assert again.encode_chat(messages) == tok.encode_chat(messages)
        assert hf.apply_chat_template(messages, return_dict=False) == tok.encode_chat(messages)[0]
