"""The chunked loss equals the plain loss (value and gradients) and never builds full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mistral_tune.train.lm_head_loss as losses
from mistral_tune.core.errors import UserError
from tests.helpers import tiny_lora_model as _tiny_lora_model


def _labels(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, -4:] = -100  # padding
    return labels


def _plain(hidden, weight, labels, divisor=None):
    logits = (hidden @ weight.t()).float()
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return total / (divisor if divisor is not None else (shift_labels != -100).sum())


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_matches_plain_loss_and_gradients(chunk_size, train_head):
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).double().requires_grad_(train_head)
    labels = _labels(3, 9, 50)

    ref = _plain(hidden, head.weight, labels)
    ref.backward()
    ref_grads = (hidden.grad.clone(), head.weight.grad.clone() if train_head else None)
    hidden.grad = None
    head.weight.grad = None

    got = losses.causal_lm_loss(hidden, head, labels, impl="chunked", chunk_size=chunk_size)
    (got * 3).backward()  # a non-unit upstream gradient must scale both gradients
    assert torch.allclose(got, ref.float(), atol=1e-6)
    assert torch.allclose(hidden.grad, 3 * ref_grads[0], atol=1e-9)
    if train_head:
        assert torch.allclose(head.weight.grad, 3 * ref_grads[1], atol=1e-6)
    else:
        assert head.weight.grad is None


def test_num_items_in_batch_is_the_divisor():
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    head = torch.nn.Linear(8, 20, bias=False)
    labels = _labels(2, 6, 20)
    got = losses.causal_lm_loss(hidden, head, labels, num_items_in_batch=torch.tensor(40), impl="chunked")
    assert torch.allclose(got, _plain(hidden, head.weight, labels, divisor=40), atol=1e-6)


def test_all_labels_ignored_gives_a_differentiable_zero():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    head = torch.nn.Linear(8, 20, bias=False)
    loss = losses.causal_lm_loss(hidden, head, torch.full((1, 4), -100), impl="chunked")
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0


def test_model_loss_through_captured_hidden_states_matches_model_loss():
    model = _tiny_lora_model()
    ids = torch.randint(3, 32000, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}

    ref = model(**batch, labels=labels).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    with losses.capture_lm_head_input(model) as captured:
        out = model(**batch)
    assert out.logits.shape[1] == 0  # the head projected nothing: no (batch, seq, vocab) logits
    loss = losses.causal_lm_loss(captured["hidden"], losses.output_head(model), labels, impl="chunked", chunk_size=16)
    loss.backward()
    assert torch.allclose(loss, ref, atol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4), name
    # The hook is gone afterwards: a plain call builds the logits again.
    assert model(**batch).logits.shape[1] == 40


def test_bf16_chunked_loss_is_close_to_plain():
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 32, dtype=torch.bfloat16, requires_grad=True)
    head = torch.nn.Linear(32, 300, bias=False).to(torch.bfloat16)
    labels = _labels(2, 12, 300)
    ref = _plain(hidden, head.weight, labels)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    got = losses.causal_lm_loss(hidden, head, labels, impl="chunked", chunk_size=4)
    (g_got,) = torch.autograd.grad(got, hidden)
    assert g_got.dtype == torch.bfloat16
    assert torch.allclose(got, ref, rtol=1e-3)
    assert torch.allclose(g_got.float(), g_ref.float(), atol=2e-3)


def test_auto_is_chunked_without_cuda_and_liger_needs_it():
    assert losses.resolve_impl("auto", torch.device("cpu")) == "chunked"
    assert losses.resolve_impl("plain", torch.device("cpu")) == "plain"
    with pytest.raises(UserError, match="liger"):
        losses.resolve_impl("liger", torch.device("cpu"))


def test_sharded_heads_are_detected():
    head = torch.nn.Linear(8, 20, bias=False)
    assert not losses.head_is_sharded(head)
    head.weight = torch.nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves outside the head's forward
    assert losses.head_is_sharded(head)
