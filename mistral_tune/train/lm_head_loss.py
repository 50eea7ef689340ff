"""Causal-LM cross-entropy computed from hidden states, without the full-vocabulary logits.

The plain loss path builds ``(tokens, vocab)`` logits, upcasts them to fp32, keeps a log-softmax
for backward and then a gradient of the same size: about four fp32 copies of tokens x 32000. Here
the LM head is applied to at most ``chunk_size`` tokens at a time and the gradients of the hidden
states (and of the head, when it trains) are computed during the forward pass, chunk by chunk, so
only one fp32 chunk of logits is ever alive. Only positions with a label take part at all.

Implementations (``trainer.loss``):
    plain    the model's own loss (full logits)
    chunked  ``ChunkedLinearCrossEntropy`` below (any device)
    liger    Liger-Kernel's fused linear cross-entropy (CUDA + ``liger-kernel``)
    auto     liger when it can run, else chunked

Example:
    >>> hidden = torch.randn(2, 5, 16, requires_grad=True)
    >>> head = torch.nn.Linear(16, 100, bias=False)
    >>> labels = torch.randint(0, 100, (2, 5))
    >>> loss = causal_lm_loss(hidden, head, labels, impl="chunked")
    >>> loss.backward()
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from mistral_tune.config.registry import LOSS_IMPLEMENTATIONS

IGNORE_INDEX = -100

DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk: 1024 x 32000 fp32 logits = 131 MB alive at a time


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of ``cross_entropy(hidden @ weight.T, targets)`` over rows, times ``scale``.

    ``hidden`` is ``(N, H)`` holding only rows that have a target; ``weight`` is ``(V, H)``. The
    gradients are produced in the forward pass (the softmax is at hand there), so the backward only
    rescales them by the incoming gradient and never recomputes a logit.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale: float, chunk_size: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            y = targets[start : start + chunk_size]
            # Same precision as the plain path: the matmul in the head's dtype, softmax in fp32.
            logits = (h.to(weight.dtype) @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not (need_h or need_w):
                continue
            # d(sum CE)/d logits = softmax - one_hot(target); built in place over the logits buffer.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(y.shape[0], device=y.device), y] -= 1.0
            grad_logits.mul_(scale)
            if need_h:
                grad_hidden[start : start + chunk_size] = grad_logits.to(weight.dtype) @ weight
            if need_w:
                grad_weight.addmm_(grad_logits.t(), h.float())
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        # A 0-dim fp32 factor keeps each gradient in its own dtype (bf16 stays bf16).
        grad_hidden = next(saved) * grad_output if ctx.has[0] else None
        grad_weight = (next(saved) * grad_output).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_hidden, grad_weight, None, None, None


TOKEN_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # optional, besides the log-probs

LOGPROB_CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 4M fp32 = 16 MiB (131 rows of a 32000-word vocabulary)


def logprob_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk of ``token_logprobs``: about 16 MiB of fp32 logits, whatever the vocabulary."""
    return max(1, LOGPROB_CHUNK_ELEMENTS // max(1, vocab_size))


class ChunkedTokenLogProbs(torch.autograd.Function):
    """Per-row ``log_softmax(hidden @ weight.T)[target]``, without the ``(N, vocab)`` logits, plus statistics.

    ``hidden`` is ``(N, H)`` holding only the rows to score (a preference trainer's completion tokens);
    ``weight`` is ``(V, H)``. Rows go through the head ``chunk_size`` at a time; two chunk-sized fp32
    buffers (the logits and their exponentials) are allocated once per call and reused, so a call touches
    a few tens of MB, not ``N x V`` floats per temporary.

    The gradient of a row's log-prob with respect to its hidden state is ``W[target] - softmax @ W``:
    one vector per row, known in the forward (the softmax is at hand there). It is kept (``N x H``, as
    small as ``hidden``), and the backward only scales it by the incoming per-row gradient: no logit is
    ever recomputed. When the head itself trains (full fine-tuning), its gradient depends on the
    incoming gradients, so the backward recomputes each chunk instead.

    Returns ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, fp32 (``is_top1`` bool),
    the ones not named in ``outputs`` as None. Only ``log_probs`` carries a gradient; the others are
    statistics for logging and weighting (non-differentiable).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, outputs: tuple[str, ...] = TOKEN_OUTPUTS):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        device = hidden.device
        autocast = torch.is_autocast_enabled(device.type)
        compute_dtype = torch.get_autocast_dtype(device.type) if autocast else hidden.dtype
        w = weight.to(compute_dtype)
        f32 = dict(dtype=torch.float32, device=device)
        log_probs, lse = torch.empty(n_rows, **f32), torch.empty(n_rows, **f32)
        entropy = torch.empty(n_rows, **f32) if "entropy" in outputs else None
        log_sum_sq = torch.empty(n_rows, **f32) if "log_sum_sq_probs" in outputs else None
        mean_logits = torch.empty(n_rows, **f32) if "mean_logits" in outputs else None
        is_top1 = torch.empty(n_rows, dtype=torch.bool, device=device) if "is_top1" in outputs else None
        # d log p(target) / d hidden, per row: kept only when the backward needs nothing else
        row_grad = torch.empty(hidden.shape, **f32) if need_h and not need_w else None
        rows = min(chunk_size, n_rows)
        z_buf = torch.empty((rows, vocab), **f32)  # logits, then logits - rowmax
        e_buf = torch.empty((rows, vocab), **f32)  # exp(logits - rowmax)
        with torch.autocast(device.type, enabled=False):
            for start in range(0, n_rows, chunk_size):
                end = min(start + chunk_size, n_rows)
                n = end - start
                h, y = hidden[start:end].to(compute_dtype), targets[start:end]
                z, e = z_buf[:n], e_buf[:n]
                if compute_dtype == torch.float32:
                    torch.mm(h, w.t(), out=z)
                else:
                    z.copy_(h @ w.t())  # the matmul in the compute dtype, everything after it in fp32
                target_logit = z.gather(1, y[:, None]).squeeze(1)
                if mean_logits is not None:
                    mean_logits[start:end] = z.sum(-1) / vocab
                if is_top1 is not None:
                    is_top1[start:end] = z.argmax(-1) == y  # the first maximum, as a top-1 prediction counts
                row_max = z.amax(-1)
                z.sub_(row_max[:, None])
                torch.exp(z, out=e)
                sum_exp = e.sum(-1)
                log_sum = sum_exp.log()
                lse[start:end] = row_max + log_sum
                log_probs[start:end] = target_logit - lse[start:end]
                if entropy is not None:  # log S - sum(e * (z - max)) / S
                    entropy[start:end] = log_sum - torch.bmm(e[:, None, :], z[:, :, None]).view(n) / sum_exp
                if log_sum_sq is not None:  # log sum p^2
                    log_sum_sq[start:end] = torch.bmm(e[:, None, :], e[:, :, None]).view(n).log() - 2 * log_sum
                if row_grad is not None:  # W[y] - softmax @ W
                    expected = (e.to(compute_dtype) @ w).float() / sum_exp[:, None]
                    row_grad[start:end] = w.index_select(0, y).float() - expected
        if row_grad is not None:
            ctx.save_for_backward(row_grad)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.compute_dtype, ctx.hidden_dtype = chunk_size, compute_dtype, hidden.dtype
        ctx.mark_non_differentiable(*(x for x in (entropy, log_sum_sq, mean_logits, is_top1) if x is not None))
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, *_):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_log_probs is None or not (need_h or need_w):
            return None, None, None, None, None
        g = grad_log_probs.float()
        if len(ctx.saved_tensors) == 1:  # the per-row gradients were kept: scale them
            (row_grad,) = ctx.saved_tensors
            return (g[:, None] * row_grad).to(ctx.hidden_dtype), None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        compute_dtype, chunk_size = ctx.compute_dtype, ctx.chunk_size
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h, y = hidden[start:end].to(compute_dtype), targets[start:end]
            # d(sum g * log p(y)) / d logits = g * (one_hot(y) - softmax), built over the recomputed logits
            grad_logits = (h @ w.t()).float().sub_(lse[start:end, None]).exp_().mul_(-g[start:end, None])
            grad_logits[torch.arange(end - start, device=y.device), y] += g[start:end]
            if need_h:
                grad_hidden[start:end] = (grad_logits.to(compute_dtype) @ w).float()
            if need_w:
                grad_weight.addmm_(grad_logits.t(), h.float())
        return (
            grad_hidden.to(hidden.dtype) if need_h else None,
            grad_weight.to(weight.dtype) if need_w else None,
            None,
            None,
            None,
        )


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    outputs: tuple[str, ...] = TOKEN_OUTPUTS,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """``ChunkedTokenLogProbs`` of the rows of ``hidden`` (``(N, H)``) against ``targets`` (``(N,)``).

    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``; see the class for what each is.
    """
    if chunk_size is None:
        chunk_size = logprob_chunk_rows(weight.shape[0])
    return ChunkedTokenLogProbs.apply(hidden, weight, targets, chunk_size, tuple(outputs))


def liger_available(device: torch.device) -> bool:
    """True when Liger-Kernel is installed and ``device`` is a CUDA device (its kernels are Triton)."""
    if device.type != "cuda":
        return False
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete implementation; an explicit ``liger`` must be able to run."""
    if impl not in LOSS_IMPLEMENTATIONS:
        raise ValueError(f"loss implementation {impl!r} is not one of {LOSS_IMPLEMENTATIONS}")
    if impl == "auto":
        return "liger" if liger_available(device) else "chunked"
    if impl == "liger" and not liger_available(device):
        from mistral_tune.core.errors import UserError

        raise UserError(
            "trainer.loss=liger needs a CUDA GPU and the liger-kernel package (`pip install 'mistral-tune[liger]'`). "
            "Use trainer.loss=chunked (same result, plain PyTorch) or trainer.loss=auto."
        )
    return impl


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with each position: position t predicts ``labels[t + 1]``."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def causal_lm_loss(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    *,
    num_items_in_batch: Any = None,
    impl: str = "chunked",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Mean next-token NLL of ``head(hidden)`` against ``labels`` (the model's ``-100`` convention).

    ``num_items_in_batch`` (the Trainer's count over all accumulated micro-batches) replaces the
    local count as the divisor, exactly as the model's own loss does.
    """
    targets = shifted_targets(labels).reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    h, y = flat.index_select(0, rows), targets.index_select(0, rows)
    divisor = num_items_in_batch if num_items_in_batch is not None else rows.numel()
    scale = 1.0 / max(float(divisor), 1.0)
    if impl == "plain" or type(head) is not torch.nn.Linear:
        return _plain_or_wrapped(h, head, y, scale, chunk_size, impl)
    if impl == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
        out = liger(head.weight, h.to(head.weight.dtype), y, head.bias)
        return (out[0] if isinstance(out, tuple) else out) * scale
    if head.bias is not None:
        return _plain_or_wrapped(h, head, y, scale, chunk_size, impl)
    return ChunkedLinearCrossEntropy.apply(h, head.weight, y, scale, chunk_size)


def _plain_or_wrapped(h, head, y, scale, chunk_size, impl):
    """Heads that are not a bare Linear (LoRA on lm_head, biases): chunks recomputed in backward."""
    if impl == "plain":
        return F.cross_entropy(head(h).float(), y, reduction="sum") * scale
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(part, target):
        return F.cross_entropy(head(part).float(), target, reduction="sum")

    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        total = total + checkpoint(
            chunk_loss, h[start : start + chunk_size], y[start : start + chunk_size], use_reentrant=False
        )
    return total * scale


class HeadInputCapture:
    """A hook on the model's LM head that, while ``active``, keeps its input and lets it project nothing.

    The forward still goes through the top-level model (so DDP/DeepSpeed/PEFT wrappers run as
    usual), but the ``(batch, seq, vocab)`` logits are never built: the head sees an empty
    sequence and ``hidden`` holds the final hidden states. The hook stays installed and is a no-op
    while inactive, so generation and evaluation are untouched and a compiled model is not
    recompiled every step (adding or removing a hook invalidates a torch.compile graph).

    Example:
        >>> capture = HeadInputCapture(model)
        >>> with capture.active_for_one_call():
        ...     model(input_ids=ids)
        >>> capture.hidden.shape   # (batch, seq, hidden_size)
    """

    def __init__(self, model: Any):
        self.head = output_head(model)
        self.active = False
        self.hidden = None
        self.handle = self.head.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if not self.active:
            return None
        self.hidden = args[0]
        return (args[0][..., :0, :], *args[1:]), kwargs

    @contextlib.contextmanager
    def active_for_one_call(self):
        self.active, self.hidden = True, None
        try:
            yield self
        finally:
            self.active = False

    def remove(self) -> None:
        self.handle.remove()


@contextlib.contextmanager
def capture_lm_head_input(model: Any):
    """One-off form of ``HeadInputCapture``: yields a dict whose ``"hidden"`` is set by the forward."""
    capture = HeadInputCapture(model)
    box: dict[str, Any] = {}
    try:
        with capture.active_for_one_call():
            yield box
            box["hidden"] = capture.hidden
    finally:
        capture.remove()


def head_is_sharded(head: torch.nn.Module) -> bool:
    """True when the head's weight lives in shards (DeepSpeed ZeRO-3, FSDP): not usable outside its forward."""
    weight = getattr(head, "weight", None)
    if weight is None:
        return False
    from mistral_tune.compat.deepspeed import is_zero3_param

    return weight.numel() == 0 or is_zero3_param(weight) or type(weight).__name__ == "DTensor"


def output_head(model: Any) -> torch.nn.Module:
    """The LM head of a plain, PEFT-wrapped or accelerate-wrapped causal LM."""
    inner = model
    while hasattr(inner, "module") and not hasattr(inner, "get_output_embeddings"):
        inner = inner.module  # DDP / DeepSpeed engine
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output embeddings to compute a chunked loss with")
    return head
