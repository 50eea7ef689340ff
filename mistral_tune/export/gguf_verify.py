"""Verify a GGUF file in llama.cpp itself: load it with ``xllamacpp`` (llama.cpp's engine as a prebuilt
wheel) and compare it with the merged model in transformers on held prompts.

What is compared, per prompt:

- the prompt's token count (llama.cpp's tokenizer from the GGUF vs ours);
- ``NEW_TOKENS`` greedy tokens: llama.cpp's, and transformers' argmax at each of those positions;
- the top-k next-token log-probs llama.cpp reports at every generated position, against transformers'
  log-softmax for the same ids on the same sequence (teacher-forced on llama.cpp's tokens).

llama.cpp runs with an f32 KV cache and flash attention off (its defaults, an f16 cache and flash
attention, alone move log-probs by ~1e-2). The reference is the merged model in float32 with each
weight rounded exactly as the GGUF stores it (``gguf_file.round_trip``), so the measured difference is
llama.cpp's arithmetic, not the type's rounding; how far that rounding moves log-probs from the
unrounded merged model is recorded too (``rounding_max_abs_logprob_shift``). The reference runs with
the sliding window off, as llama.cpp runs the file (``gguf_file.sliding_window_note``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

TOP_K = 5
NEW_TOKENS = 20

# Held prompts: never in the training data, short enough for a quick check on CPU. The conversation
# goes to llama.cpp as the GGUF's chat template renders it (control tokens parsed, as llama-server does)
# and must read as the ids of our chat encoder.
GGUF_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    [{"role": "user", "content": "Give me three words that rhyme with cat."}],
)


def prompt_text_and_ids(tokenizer: Any, prompt: Any) -> tuple[str, list[int]]:
    """What llama.cpp is sent (text; it adds BOS itself) and the ids our tokenizer gives the same prompt."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt)
    rendered = tokenizer.to_hf().apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.decode([tokenizer.bos_id], skip_special_tokens=False)
    return rendered.removeprefix(bos), tokenizer.apply_chat_template(prompt)


# Largest |top-k log-prob difference| accepted between llama.cpp and the rounded reference, per type:
# about 3x what mistral_tiny exports measure (docs/export.md, "GGUF"). f32 differs only by summation
# order. The others cannot reach 1e-4: llama.cpp's CPU matrix products round the activations to the
# weight's type first (f16, bf16), or quantize them to 8-bit blocks (q8_0, q4_0), which the float32
# reference does not; measured 7.0e-3 (f16), 4.8e-2 (bf16), 0.138 (q8_0), 0.173 (q4_0).
GGUF_TOLERANCE = {"f32": 1e-4, "f16": 0.025, "bf16": 0.15, "q8_0": 0.4, "q4_0": 0.5}
# Mixture-of-experts models (Mixtral) in q8_0/q4_0: llama.cpp's 8-bit activations move the router's
# inputs, and where two experts' probabilities nearly tie the other one runs, a discontinuous jump in
# every later log-prob. mixtral_tiny measured 0.71 (q8_0) and 0.039 (q4_0), against 2.4 for a file with
# the experts' gate and up matrices swapped (docs/export.md, "GGUF"). f32/f16/bf16 keep the dense figures.
GGUF_TOLERANCE_MOE = {**GGUF_TOLERANCE, "q8_0": 1.5, "q4_0": 1.5}


def default_tolerance(gguf_type: str, config: Any) -> float:
    """The accepted max |top-k log-prob diff| for a ``gguf_type`` file of the model with ``config``."""
    moe = bool(getattr(config, "num_local_experts", 0))
    return (GGUF_TOLERANCE_MOE if moe else GGUF_TOLERANCE)[gguf_type]


class GGUFMismatch(RuntimeError):
    """The GGUF file does not reproduce the merged model in llama.cpp."""


def xllamacpp_available() -> bool:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCpp:
    """A GGUF file loaded in llama.cpp (xllamacpp's in-process server), asked one token at a time.

    One token per request because llama.cpp's completion reports no log-probs for a token that ends
    inside a UTF-8 character (byte-fallback pieces): over several tokens its list silently skips them.
    """

    def __init__(self, path: Path, top_k: int = TOP_K, threads: Optional[int] = None):
        import xllamacpp as xlc

        params = xlc.CommonParams()
        params.model.path = str(path)
        params.n_ctx = 512
        params.n_parallel = 1
        if threads is None:  # a small model gains nothing from more threads, and waits for each on a busy CPU
            threads = 1 if Path(path).stat().st_size < 2**30 else min(8, os.cpu_count() or 1)
        for cpu in (params.cpuparams, params.cpuparams_batch):
            cpu.n_threads = threads
            cpu.poll = 0  # sleep, do not spin, between ops: spinning threads stall a shared CPU
        params.cache_type_k = xlc.ggml_type.GGML_TYPE_F32  # the default f16 cache alone moves log-probs ~1e-2
        params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
        params.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.warmup = False
        params.verbosity = 1  # warnings and errors only, not a line per request
        self.path, self.top_k = Path(path), top_k
        self.server = xlc.Server(params)

    def next_token(self, prompt: Any) -> tuple[int, Optional[int], Optional[dict[int, float]]]:
        """(prompt tokens read, the greedy token, {id: log-prob} of the top k) after ``prompt`` (text,
        or token ids used as they are); the token and log-probs are None for a partial UTF-8 character."""
        request = {
            "prompt": prompt,
            "n_predict": 1,
            "temperature": 0.0,
            "n_probs": self.top_k,
            "post_sampling_probs": False,
            "ignore_eos": True,
            "cache_prompt": True,
        }
        answer = self.server.handle_completions(request)  # a dict request is answered synchronously, as a dict
        if "error" in answer:
            raise GGUFMismatch(f"llama.cpp could not run {self.path}: {answer['error']}")
        count = int(answer["usage"]["prompt_tokens"])
        steps = (answer["choices"][0].get("logprobs") or {}).get("content") or []  # OpenAI completion layout
        if not steps:
            return count, None, None
        return count, int(steps[0]["id"]), {int(t["id"]): float(t["logprob"]) for t in steps[0]["top_logprobs"]}


def rounded_reference(merged_dir: Path, tokenizer: Any, gguf_type: str):
    """The merged model in float32, each weight rounded as the GGUF stores it; the sliding window off
    where the file cannot carry it (Mistral), kept where it does (Ministral's per-layer windows)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mistral_tune.export.gguf_file import ggml_type_for, layer_windows, round_trip

    config = AutoConfig.from_pretrained(merged_dir)
    if not layer_windows(config.to_dict()):
        config.sliding_window = None  # llama.cpp attends to the whole context
    model = AutoModelForCausalLM.from_pretrained(merged_dir, config=config, dtype=torch.float32)
    model.eval()
    rounded = {}
    with torch.no_grad():
        for name, param in model.named_parameters():  # the same rule the writer applies to each tensor
            kind = ggml_type_for(name, param.dim(), gguf_type)
            if kind != "F32":
                rounded[name] = param.detach().clone()
                param.copy_(round_trip(param.detach(), kind))
    return model, rounded


def next_token_logprobs(model: Any, ids: Sequence[int]):
    """log-softmax of the next-token logits after ``ids`` (float32)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids)])).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)


def sequence_logprobs(model: Any, sequences: Sequence[tuple[list[int], int]]) -> list[Any]:
    """Per (ids, prompt length): log-softmax at the positions that predict the generated tokens."""
    import torch

    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0, n - 1 :], -1) for s, n in sequences]


def verify_gguf(
    path: Path,
    merged_dir: Path,
    tokenizer: Any,
    gguf_type: str,
    *,
    prompts: Sequence[Any] = GGUF_PROMPTS,
    tolerance: Optional[float] = None,
    top_k: int = TOP_K,
    new_tokens: int = NEW_TOKENS,
) -> dict[str, Any]:
    """Run ``path`` in llama.cpp and the merged model in transformers; raise GGUFMismatch unless the
    token counts match, the top-k log-probs agree within ``tolerance`` and the greedy tokens are equal
    (a different token is accepted only where the reference's top two are within ``tolerance``: a tie).

    Returns what summary.json records under ``gguf.files[i].verification``.

    Example::

        verify_gguf(Path("runs/x/gguf/x-q8_0.gguf"), Path("runs/x/merged"), tokenizer, "q8_0")
    """
    import torch

    from mistral_tune.export.gguf_file import layer_windows

    model, originals = rounded_reference(Path(merged_dir), tokenizer, gguf_type)
    tol = default_tolerance(gguf_type, model.config) if tolerance is None else tolerance
    windowed = bool(layer_windows(model.config.to_dict()))
    llama = LlamaCpp(Path(path), top_k)

    def byte_piece(i: int) -> bool:  # a token that is only part of a UTF-8 character
        return tokenizer.id_to_piece(i).startswith("<0x") or "\ufffd" in tokenizer.decode([i])

    problems: list[str] = []
    worst, greedy_equal, ties, unreported, count_mismatches = 0.0, 0, 0, 0, 0
    sequences = []
    for prompt in prompts:
        text, prompt_ids = prompt_text_and_ids(tokenizer, prompt)
        count, token, top = llama.next_token(text)
        if count != len(prompt_ids):
            count_mismatches += 1
            problems.append(f"prompt {text!r}: llama.cpp read {count} tokens, the tokenizer {len(prompt_ids)}")
            continue
        seq = list(prompt_ids)
        for step in range(new_tokens):
            if step:
                _, token, top = llama.next_token(seq)
            logp = next_token_logprobs(model, seq)
            best = int(torch.argmax(logp))
            if token is None:  # a partial UTF-8 character: llama.cpp reports nothing; it must be a byte piece
                unreported += 1
                if not byte_piece(best):
                    problems.append(
                        f"prompt {text!r}, token {step}: llama.cpp gave no token where transformers chose {best}"
                    )
                    break
                seq.append(best)
                continue
            for tid, lp in top.items():
                worst = max(worst, abs(lp - float(logp[tid])))
            if best == token:
                greedy_equal += 1
            elif float(logp[best] - logp[token]) <= tol:
                ties += 1
            else:
                problems.append(
                    f"prompt {text!r}, token {step}: llama.cpp chose {token}, transformers {best} "
                    f"(log-probs {float(logp[token]):.5f} vs {float(logp[best]):.5f})"
                )
            seq.append(token)
        sequences.append((seq, len(prompt_ids)))
    del llama
    if worst > tol:
        problems.append(f"max |top-{top_k} log-prob diff| {worst:.3g} exceeds the tolerance {tol:.3g}")
    # How far the GGUF type's rounding alone moves the log-probs (informational).
    shift = 0.0
    if originals:
        rounded = sequence_logprobs(model, sequences)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in originals:
                    param.copy_(originals[name])
        for exact, approx in zip(sequence_logprobs(model, sequences), rounded):
            shift = max(shift, float((exact - approx).abs().max()))
    del model
    result = {
        "engine": "llama.cpp (xllamacpp), f32 KV cache, flash attention off",
        "reference": "merged model in transformers, float32, weights rounded as stored in the GGUF, "
        + ("per-layer sliding windows on, as in the file" if windowed else "sliding window off"),
        "prompts": len(prompts),
        "prompt_tokens_equal": count_mismatches == 0,
        "greedy_tokens": greedy_equal + ties,
        "greedy_tokens_equal": greedy_equal,
        "greedy_near_ties": ties,
        "greedy_tokens_expected": len(prompts) * new_tokens - unreported,
        "byte_tokens_unreported": unreported,
        "top_k": top_k,
        "max_abs_logprob_diff": worst,
        "tolerance": tol,
        "rounding_max_abs_logprob_shift": shift,
    }
    if problems:
        raise GGUFMismatch(f"GGUF {path} does not reproduce the merged model in llama.cpp: " + "; ".join(problems))
    return result
