"""Shared test helpers: a tiny-model harness (configs, models, a LoRA model) and run-directory readers.

Fixtures built on these (the tiny causal LM, the tokenizers) live in tests/conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from mistral_tune.models.presets import PRESETS

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sft_sample.jsonl"

# The tiny preset's MistralConfig keyword arguments (the same dict the preset holds, not a copy).
TINY_CONFIG = PRESETS["mistral_tiny"].config

# A smaller, untied, short-window model for export tests.
SMALL_CONFIG = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,
    initializer_range=0.1,
    tie_word_embeddings=False,
)


def small_base(seed=0):
    """A MistralForCausalLM of SMALL_CONFIG, seeded, in eval mode."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**SMALL_CONFIG)).eval()


def tiny_lora_model(attn="sdpa", **config):
    """The tiny preset (seed 0; `config` overrides its MistralConfig keys) with a non-identity rank-4 LoRA
    on q_proj and v_proj."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**{**TINY_CONFIG, **config}, attn_implementation=attn))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, lora)


# ---- data files ----------------------------------------------------------------------------------------


def write_jsonl(path, rows, *, as_str=False):
    """Write rows as JSON lines; return the path (as a str when as_str)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path) if as_str else path


def write_lines(path: Path, lines: list) -> Path:
    """Write str (UTF-8 encoded) or raw bytes lines, one per line."""
    with path.open("wb") as f:
        for line in lines:
            f.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return path


def good_rows(n: int) -> list[str]:
    """The first n lines of the bundled SFT sample."""
    return SAMPLE.read_text(encoding="utf-8").splitlines()[:n]


def chat(user: str, assistant: str, **extra) -> str:
    """One chat row as a JSON line."""
    return json.dumps(
        {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}
    )


def hostile_file(tmp_path: Path) -> Path:
    """20 good rows plus one of each kind of trouble, at known line numbers."""
    lines = good_rows(20)
    lines += [
        '{"messages": [{"role": "user", "content": "hi"}',  # line 21: malformed JSON
        b'{"text": "caf\xe9"}',  # line 22: Latin-1 byte, not UTF-8
        "[1, 2, 3]",  # line 23: not an object
        json.dumps({"prompt": "no messages field"}),  # missing field
        chat("", "an empty user turn"),  # empty string
        chat("Say hi.", "Hi.", id=7, source="extra fields are ignored"),  # extra fields, still used
        chat("Repeat this.", "Repeat."),
        chat("Repeat this.", "Repeat."),  # exact duplicate of the line above
        chat("Long " * 200, "too long for max_length=64"),
    ]
    return write_lines(tmp_path / "hostile.jsonl", lines)


def fake_checkpoint(root: Path, step: int, *, complete: bool = True) -> Path:
    """A small checkpoint-<step> directory, with its completeness marker unless complete=False."""
    from mistral_tune.train import checkpoints

    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (path / "optimizer.pt").write_bytes(b"o" * 200)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        checkpoints.write_marker(path, {"step": step})
    return path


# ---- run-directory readers -----------------------------------------------------------------------------


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_metrics(run_dir) -> list[dict]:
    """A run's metrics.jsonl records."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def read_summary(run_dir) -> dict:
    """A run's summary.json."""
    return json.loads((Path(run_dir) / "summary.json").read_text())


def tiny_tekken_file(path: Path, special_tokens: list[str] | None = None, version: str = "v3") -> Path:
    """A small Tekken tokenizer file in mistral-common's format: the 256 bytes, a few merges, and
    24 special tokens (mistral-common's defaults when ``special_tokens`` is None, as in its shipped
    files; else these, padded with fillers)."""
    import base64

    merges = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b" world", b"  ", b"\n\n"]
    pieces = [bytes([i]) for i in range(256)] + merges
    vocab = [
        {"rank": i, "token_bytes": base64.b64encode(p).decode(), "token_str": p.decode("utf-8", "replace")}
        for i, p in enumerate(pieces)
    ]
    # The split pattern of mistral-common's shipped Tekken files.
    pattern = (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
        r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
        r"\s+(?!\S)|\s+"
    )
    config = dict(pattern=pattern, num_vocab_tokens=len(vocab), default_vocab_size=24 + len(vocab))
    config.update(default_num_special_tokens=24, version=version)
    data: dict = {"config": config, "vocab": vocab}
    if special_tokens is not None:
        data["special_tokens"] = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(special_tokens)]
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def mc_chat_ids(mc, messages: list[dict]) -> list[int]:
    """mistral-common's ids for a conversation (``mc``: its ``MistralTokenizer``).  One ending on an
    answer (training): the request up to the last user turn, then the answer as mistral-common
    encodes answers mid-conversation (content + EOS)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    if messages[-1]["role"] == "assistant":
        answer = AssistantMessage(content=messages[-1]["content"])
        return mc_chat_ids(mc, messages[:-1]) + mc.instruct_tokenizer.encode_assistant_message(answer, False)
    roles = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[roles[m["role"]](content=m["content"]) for m in messages])
    return mc.encode_chat_completion(request).tokens
