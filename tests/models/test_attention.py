"""Sliding-window attention is exact on every CPU backend: eager, sdpa and flex_attention.

The reference is written here from the Mistral definition (RoPE, grouped-query attention, causal mask
plus a window of ``sliding_window`` positions, padding excluded), not taken from transformers. The
tiny preset's window is 32, and every sequence below is longer than that, so the window matters.

flex_attention on CPU: inductor compiles it for inference only (torch has no CPU flex backward), once
per shape, and with torch 2.13 some decoding shapes fail to compile (CppCompileError). The fast tests
therefore swap transformers' ``torch.compile(flex_attention)`` for torch's own uncompiled
``flex_attention`` (same block mask and score_mod from transformers, unfused kernel); the slow test
runs the compiled kernel on a forward pass.
"""

from __future__ import annotations

import logging
import math
import sys
import types

import pytest
import torch
import transformers.integrations.flex_attention as hf_flex

from mistral_tune import MistralCausalLM
from mistral_tune.core.errors import UserError
from mistral_tune.inference.generation import generate_ids, left_pad, positions_from_mask
from mistral_tune.inference.samplers import GreedySampler
from mistral_tune.inference.scoring import batch_logits
from mistral_tune.models.attention import pick_attn_implementation

BACKENDS = ("eager", "sdpa", "flex_attention")


WINDOW = 32


@pytest.fixture(scope="module")
def uncompiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    def flex_without_compile(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_flex, "compile_friendly_flex_attention", flex_without_compile)
        yield


@pytest.fixture(scope="module")
def models(uncompiled_flex):
    """The same tiny model (seed 0) once per backend."""
    out = {name: MistralCausalLM.from_preset("mistral_tiny", attn_implementation=name) for name in BACKENDS}
    assert out["eager"].hf_model.config.sliding_window == WINDOW
    return out


def batch(lengths, seed=0):
    """Random token rows of the given lengths, left-padded, plus the unpadded rows."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 32000, (n,), generator=g).tolist() for n in lengths]
    ids, mask = left_pad(rows, 0)
    return rows, ids, mask


def naive_attention(attn, x, mask, window, theta):
    """One Mistral attention layer from its weights, in float64, with an explicit window mask."""
    cfg = attn.config
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = x.double()
    b, t, _ = x.shape
    q = (x @ attn.q_proj.weight.double().T).view(b, t, nh, hd)
    k = (x @ attn.k_proj.weight.double().T).view(b, t, nkv, hd)
    v = (x @ attn.v_proj.weight.double().T).view(b, t, nkv, hd)
    pos = (mask.cumsum(-1) - 1).clamp(min=0).double()  # a left-padded row keeps its own positions
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = pos[..., None] * inv_freq  # [b, t, hd/2]
    cos = torch.cat([angle.cos(), angle.cos()], -1)[:, :, None]
    sin = torch.cat([angle.sin(), angle.sin()], -1)[:, :, None]

    def rope(z):  # rotate the two halves of each head (the Hugging Face weight layout)
        z1, z2 = z[..., : hd // 2], z[..., hd // 2 :]
        return z * cos + torch.cat([-z2, z1], -1) * sin

    q, k = rope(q), rope(k)
    out = torch.zeros(b, t, nh, hd, dtype=torch.float64)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    for r in range(b):
        p = pos[r]
        allowed = (j <= i) & ((p[:, None] - p[None, :]) < window) & mask[r].bool()[None, :]
        for h in range(nh):
            kv = h // (nh // nkv)  # grouped-query attention: query heads share key/value heads
            scores = (q[r, :, h] @ k[r, :, kv].T) / math.sqrt(hd)
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a padding query row attends to nothing
            out[r, :, h] = probs @ v[r, :, kv]
    return out.reshape(b, t, nh * hd) @ attn.o_proj.weight.double().T


def uncached_greedy(model, rows, steps):
    """Greedy decoding by full forward passes over the whole (left-padded) sequence, no cache."""
    rows = [list(r) for r in rows]
    new = [[] for _ in rows]
    for _ in range(steps):
        ids, mask = left_pad(rows, 0)
        with torch.no_grad():
            logits = batch_logits(model, ids, mask)[0]
        for r, tok in enumerate(logits[:, -1].argmax(-1).tolist()):
            rows[r].append(tok)
            new[r].append(tok)
    return new


COMPILED_FLEX = hf_flex.compile_friendly_flex_attention


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_naive_windowed_attention(models, backend):
    lm = models[backend]
    attn = lm.hf_model.model.layers[1].self_attn
    seen = {}
    pre = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["hidden_states"]), with_kwargs=True)
    post = attn.register_forward_hook(lambda m, a, out: seen.update(y=out[0]))
    _, ids, mask = batch([80, 67])  # both longer than twice the window; row 1 has 13 pads on the left
    try:
        with torch.no_grad():
            batch_logits(lm.hf_model, ids, mask)
    finally:
        pre.remove()
        post.remove()
    theta = lm.hf_model.config.rope_parameters["rope_theta"]
    expected = naive_attention(attn, seen["x"], mask, WINDOW, theta)
    real = mask.bool()
    diff = (seen["y"].double() - expected)[real].abs().max().item()
    assert diff < 1e-4, f"{backend}: max |diff| {diff}"
    # The check can fail: without the window the same reference is far off.
    unwindowed = naive_attention(attn, seen["x"], mask, 10**6, theta)
    assert (seen["y"].double() - unwindowed)[real].abs().max().item() > 1e-2


@pytest.mark.usefixtures("single_thread")
def test_logits_agree_across_backends_and_padding(models):
    rows, ids, mask = batch([80, 67], seed=1)  # the shapes of the layer test (flex traces each new shape)
    logits = {}
    for name, lm in models.items():
        with torch.no_grad():
            logits[name] = batch_logits(lm.hf_model, ids, mask)[0]
    real = mask.bool()
    for name in ("sdpa", "flex_attention"):
        assert (logits[name] - logits["eager"])[real].abs().max() < 1e-4, name
    # A left-padded row gives exactly the logits of the row alone.
    for r, row in enumerate(rows):
        with torch.no_grad():
            alone = batch_logits(models["sdpa"].hf_model, [row])[0][0]
        assert (logits["sdpa"][r, -len(row) :] - alone).abs().max() < 1e-4


@pytest.mark.usefixtures("single_thread")
def test_training_loss_and_gradients_agree_across_backends(models):
    _, ids, mask = batch([80, 67], seed=2)
    # Nothing predicts a row's first real token (the position before it is padding): no label there.
    first = torch.zeros_like(mask).scatter_(1, mask.argmax(1, keepdim=True), 1)
    labels = ids.masked_fill((mask == 0) | (first == 1), -100)
    losses, grads = {}, {}
    for name, lm in models.items():
        model = lm.hf_model
        model.train()
        try:
            kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), labels=labels)
            if name == "flex_attention":  # torch has no flex_attention backward on CPU
                with torch.no_grad():
                    losses[name] = model(**kwargs).loss
                continue
            model.zero_grad()
            loss = model(**kwargs).loss
            loss.backward()
            losses[name] = loss.detach()
            grads[name] = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
            model.zero_grad()
        finally:
            model.eval()
    for name in ("sdpa", "flex_attention"):
        assert abs(losses[name] - losses["eager"]) < 1e-5, name
    assert torch.allclose(grads["sdpa"], grads["eager"], rtol=1e-4, atol=1e-7)
    assert grads["eager"].abs().max() > 0


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_generation_matches_uncached_past_the_window(models, backend):
    lm = models[backend]
    rows, _, _ = batch([45, 29], seed=3)  # one prompt past the window; the batch is left-padded
    steps = 10  # 45 + 10 = 55 tokens: the cache keeps only the last 31 keys, dropping one per step
    cached = generate_ids(  # transformers' generate(): KV cache with sliding-window layers
        lm.hf_model, lm.tokenizer, rows, sampler=GreedySampler(), max_length=45 + steps, stop_ids=None
    )
    # max_length is each row's own limit (keras-hub's rule): the 29-token row gets 26 new tokens.
    limits = [45 + steps - len(r) for r in rows]
    assert [len(c) for c in cached] == limits
    # The uncached reference runs on eager attention (same weights; the logits test shows they agree).
    reference = uncached_greedy(models["eager"].hf_model, rows, max(limits))
    assert cached == [ref[:n] for ref, n in zip(reference, limits)]


@pytest.mark.usefixtures("single_thread")
def test_pick_attn_implementation_logs_and_errors(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="mistral_tune.models.attention"):
        assert pick_attn_implementation("auto") == "sdpa_packed"  # no CUDA here
        assert pick_attn_implementation("eager") == "eager"
    assert "attention backend: sdpa_packed (auto; flash-attn not usable)" in caplog.text
    assert "attention backend: eager (requested)" in caplog.text
    with caplog.at_level(logging.WARNING, logger="mistral_tune.models.attention"):
        assert pick_attn_implementation("flex_attention") == "flex_attention"
    assert "inference only" in caplog.text
    with pytest.raises(UserError, match="flash-attn >= 2.3"):
        pick_attn_implementation("flash_attention_2")
    with pytest.raises(UserError, match="is not one of"):
        pick_attn_implementation("flash3")

    # A GPU with flash-attn cannot exist here: fake CUDA and the module to check the choice logic.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(__version__="2.6.3"))
    assert pick_attn_implementation("auto") == "flash_attention_2"
    assert pick_attn_implementation("flash_attention_2") == "flash_attention_2"
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(__version__="2.1.0"))  # no windows yet
    assert pick_attn_implementation("auto") == "sdpa_packed"
    with pytest.raises(UserError, match="CUDA available: True"):
        pick_attn_implementation("flash_attention_2")


@pytest.mark.usefixtures("single_thread")
@pytest.mark.slow
def test_compiled_flex_attention_forward_matches_naive(monkeypatch):
    """The real compiled flex kernel (inductor, CPU inference) on a windowed, left-padded batch."""
    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", COMPILED_FLEX)
    lm = MistralCausalLM.from_preset("mistral_tiny", attn_implementation="flex_attention")
    attn = lm.hf_model.model.layers[0].self_attn
    seen = {}
    pre = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["hidden_states"]), with_kwargs=True)
    post = attn.register_forward_hook(lambda m, a, out: seen.update(y=out[0]))
    _, ids, mask = batch([64, 50], seed=4)
    with torch.no_grad():
        batch_logits(lm.hf_model, ids, mask)
    pre.remove()
    post.remove()
    expected = naive_attention(attn, seen["x"], mask, WINDOW, lm.hf_model.config.rope_parameters["rope_theta"])
    assert (seen["y"].double() - expected)[mask.bool()].abs().max().item() < 1e-4


def test_flash_attention_without_cuda_is_a_clear_error():
    with pytest.raises(UserError, match="flash-attn"):
        pick_attn_implementation("flash_attention_2")
