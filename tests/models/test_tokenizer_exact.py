"""Every tokenizer file mistral-common ships is exact against mistral-common, for plain text and for
chat, through `MistralTokenizer` and through its exported Hugging Face tokenizer (saved, then loaded
with plain `AutoTokenizer`).

Each file is checked on a few hundred strings (hand-picked edge cases, seeded random strings built
from the hard parts: space runs, newlines, tabs, CJK, emoji, combining marks, other scripts, code, digits; and the
real Alpaca rows when /work/shared/data/alpaca_5000.json is present) and a few hundred
conversations (system prompt or not, one to three turns, ending on a user turn for generation or on
an answer for training).  Loaded tokenizers are shared per file (module-scoped fixtures).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MCTokenizer

from mistral_tune.models.tokenizer import (
    TOKENIZER_FILES,
    MistralTokenizer,
    infer_chat_template,
    shipped_tokenizer_files,
    tokenizer_file,
)
from tests.helpers import mc_chat_ids

ALPACA = Path("/work/shared/data/alpaca_5000.json")

EDGE = [
    "", " ", "  leading", "trailing  ", "a  b   c", "\n", "\n\nx\t\ty", "\t", "   \n  \n", "a\r\nb", "\r\n\r\n",
    "naïve café", "e\u0301 combining", "日本語のテキスト", "多  空格\n\t混合", "한국어 문장", "emoji 🤖🚀",
    "ÅÄÖ ß Ω ∑ ≥ → 😀👍🏽", "👨‍👩‍👧 family", "\u200b zero width", "x" * 50, " " * 40 + "|", "-" * 37,
    "def f(x):\n    return x**2  # c", "    indented code\n        more", '{"json": [1, 2, 3]}',
    "<html><b>bold</b></html>", "mixed 123 4567 89.0e-3", "I'm you're they'LL 'S", "▁ literal sentencepiece space",
    "Hello, world!", "ALL CAPS AND lower", "tab\tseparated\tvalues\n1\t2\t3",
]  # fmt: skip

_PARTS = list(" -ab\n=é日🤖0.\tA'\r") + [
    "the", "ing", "  ", "----", "    ", "\r\n", "ion", "Hello", "世界", "👍🏽", "\u0301", "123456", "'s", "'LL",
    "def ", "():", "\n    ", "{}", "😀", "ü", "Ω", "—", "...", "https://x.org/a?b=1", "\u00a0", "\u3000", "ﬁ",
    "١٢٣", "שלום", "Привет", "नमस्ते",
]  # fmt: skip


def _random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_PARTS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def _alpaca_rows() -> list[dict]:
    if not ALPACA.is_file():
        return []
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[::25]  # 200 rows spread over the file
    return [r for r in rows if r["output"].strip()]  # mistral-common refuses empty answers


ROWS = _alpaca_rows()
TEXTS = EDGE + _random_strings(200, seed=1) + [r["instruction"] for r in ROWS] + [r["output"] for r in ROWS]


def _conversations() -> list[list[dict]]:
    """System or not, 1-3 user turns, ending on a user turn or an answer; random and Alpaca content."""
    rng = random.Random(2)
    pool = _random_strings(120, seed=3) + EDGE
    answers = [s for s in pool if s.strip(" ")]  # mistral-common refuses empty answers (after v3's rstrip)
    systems = ["You are a helpful assistant.", "Be brief.\n", " Réponds en français 🇫🇷", "", "sys\n\nprompt"]
    out = []
    for i in range(160):
        messages = [{"role": "system", "content": rng.choice(systems)}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": rng.choice(pool)})
            messages.append({"role": "assistant", "content": rng.choice(answers)})
        if i % 2:
            messages.pop()  # generation: end on a user turn
        out.append(messages)
    for j, r in enumerate(ROWS[:120]):
        prompt = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]
        if j % 4 == 0:
            messages.insert(0, {"role": "system", "content": "Below is an instruction. Answer it."})
        out.append(messages if j % 3 else messages[:-1])
    return out


CONVERSATIONS = _conversations()


def masked_spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans, current = [*spans, current], []
    return spans + ([current] if current else [])


VERSIONS = [v for v, f in TOKENIZER_FILES.items() if f.filename in shipped_tokenizer_files()]


@pytest.fixture(scope="module", params=VERSIONS)
def loaded(request, tmp_path_factory):
    """(version, ours, mistral-common's, our HF export reloaded from disk by plain AutoTokenizer)."""
    from transformers import AutoTokenizer

    version = request.param
    ours = MistralTokenizer.from_version(version)
    directory = tmp_path_factory.mktemp(version)
    ours.save_pretrained(directory)
    hf = AutoTokenizer.from_pretrained(str(directory))
    return version, ours, MCTokenizer.from_file(str(tokenizer_file(version))), hf


def test_every_shipped_file_is_covered():
    assert sorted(f.filename for f in TOKENIZER_FILES.values() if f.version in VERSIONS) == shipped_tokenizer_files()
    assert len(TEXTS) >= 200 + len(EDGE) and len(CONVERSATIONS) >= 160


def test_text_exact(loaded):
    version, ours, mc, hf = loaded
    reference = mc.instruct_tokenizer.tokenizer
    assert ours.vocabulary_size == reference.n_words == TOKENIZER_FILES[version].vocabulary_size
    assert (ours.bos_id, ours.eos_id) == (reference.bos_id, reference.eos_id)
    assert ours.pad_id != ours.eos_id and hf.pad_token_id == ours.pad_id != hf.eos_token_id
    assert (hf.bos_token_id, hf.eos_token_id) == (ours.bos_id, ours.eos_id)
    mismatches = []
    for text, hf_ids in zip(TEXTS, hf(TEXTS)["input_ids"]):
        ids = ours.encode(text)
        if ids != reference.encode(text, bos=True, eos=False) or ours.encode(text, False, True) != reference.encode(
            text, bos=False, eos=True
        ):
            mismatches.append(("encode", text))
        if ours.decode(ids) != reference.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE):
            mismatches.append(("decode", text))
        if hf_ids != ids:
            mismatches.append(("hf encode", text))
        if hf.decode(hf_ids, skip_special_tokens=True) != ours.decode(ids):
            mismatches.append(("hf decode", text))
    assert not mismatches, f"{len(mismatches)} mismatches on {len(TEXTS)} strings: {mismatches[:5]}"


def test_decode_keeps_special_tokens_as_mistral_common(loaded):
    _, ours, mc, _ = loaded
    reference = mc.instruct_tokenizer.tokenizer
    ids = [ours.bos_id, *ours.encode("héllo 世界", add_bos=False), ours.eos_id, *ours.encode(" x", add_bos=False)]
    assert ours.decode(ids) == reference.decode(ids, SpecialTokenPolicy.IGNORE)
    if ours.kind == "tekken":
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, SpecialTokenPolicy.KEEP)
    else:  # mistral-common writes raw pieces ("▁x"); we decode the text between control tokens
        assert ours.decode(ids, skip_special_tokens=False).startswith("<s>héllo 世界</s>")


def test_decode_of_partial_characters(loaded):
    """Prefixes that cut a character's bytes (as streaming generation does) decode as mistral-common's."""
    _, ours, mc, _ = loaded
    reference = mc.instruct_tokenizer.tokenizer
    ids = ours.encode("日本語 🤖👍🏽 ﬁ", add_bos=False)
    for k in range(1, len(ids) + 1):
        assert ours.decode(ids[:k]) == reference.decode(ids[:k], SpecialTokenPolicy.IGNORE), k
    assert ours.decode(ids[1:]) == reference.decode(ids[1:], SpecialTokenPolicy.IGNORE)


def test_chat_exact(loaded):
    version, ours, mc, hf = loaded
    assert hf.chat_template == ours.jinja_chat_template
    # The file's format as the table gives it, and as inferred from the file alone (its version or control tokens).
    assert ours.chat_format == TOKENIZER_FILES[version].chat_template == infer_chat_template(ours._backend)
    mismatches = []
    for messages in CONVERSATIONS:
        ids, mask = ours.encode_chat(messages)
        if ids != mc_chat_ids(mc, messages):
            mismatches.append(("ours", messages))
        if hf.apply_chat_template(messages, tokenize=True, return_dict=False) != ids:
            mismatches.append(("hf", messages))
        # The mask covers exactly the answers (v3 onwards without trailing spaces) and their EOS.
        rstrip = ours.chat_format != "v1"
        answers = [m["content"].rstrip(" ") if rstrip else m["content"] for m in messages if m["role"] == "assistant"]
        if masked_spans(ids, mask) != [[*ours.encode(a, add_bos=False), ours.eos_id] for a in answers]:
            mismatches.append(("mask", messages))
    assert not mismatches, f"{len(mismatches)} mismatches on {len(CONVERSATIONS)} conversations: {mismatches[:3]}"
