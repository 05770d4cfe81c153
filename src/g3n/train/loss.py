"""Cross-entropy of soft-capped logits without materialising (tokens x vocab) logits.

Gemma 3n's vocabulary is 262,400 wide: the logits of one 8K-token sequence take 8.6 GB in float32,
and autograd keeps several copies. This loss walks the tokens in chunks: the forward keeps only
each chunk's log-sum-exp, and the backward recomputes the chunk's logits to form its gradients,
so at most one chunk of logits exists at a time. Pure PyTorch, so it runs on CPU and GPU alike
(fused GPU kernels can replace it where they pay).
"""

from __future__ import annotations

import functools

import torch

from g3n.train import recompute

IGNORE = -100


def _chunk_tanh(h: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """tanh(logits / softcap) (or the raw logits without a cap), float32, computed in place."""
    t = (h @ weight.t()).float()
    return t.div_(softcap).tanh_() if softcap else t


def _chunk_forward(h, weight, safe, softcap):
    """(log-sum-exp, target logit) of one chunk of rows."""
    logits = _chunk_tanh(h, weight, softcap)
    if softcap:
        logits.mul_(softcap)  # in place: one (chunk x vocab) float32 buffer when run eagerly
    return torch.logsumexp(logits, dim=-1), logits.gather(1, safe[:, None]).squeeze(1)


def _chunk_backward(h, weight, safe, scale, lse, softcap):
    """d loss / d logits of one chunk (`scale`: the rows' weights in the mean, 0 for ignored)."""
    t = _chunk_tanh(h, weight, softcap)
    g = (t * softcap if softcap else t).sub_(lse[:, None]).exp_()  # softmax; in place (eager memory)
    if torch.compiler.is_compiling():
        # The target's -1 as a comparison keeps the whole gradient one fused pass over the matmul's
        # output; a scatter stops the fusion and leaves a (chunk x vocab) float32 buffer (512 MiB
        # at 512 rows), which raises the step's peak memory.
        hit = torch.arange(g.shape[1], device=g.device)[None, :] == safe[:, None]
        g = (g - hit.to(g.dtype)) * scale[:, None]
    else:
        g.scatter_add_(1, safe[:, None], -torch.ones_like(g[:, :1])).mul_(scale[:, None])
    if softcap:
        g.mul_(t.square_().neg_().add_(1))  # d(c tanh(x/c))/dx = 1 - tanh^2
    return g.to(h.dtype)


def _compiled():
    """The chunk functions through torch.compile: the soft-cap, softmax and their gradients fuse
    into the matmul's neighbours instead of several passes over (chunk x 262400) float32."""
    return _compile(recompute.BACKEND)


@functools.cache
def _compile(backend: str):
    return tuple(
        recompute.in_training_settings(torch.compile(f, dynamic=True, backend=backend))
        for f in (_chunk_forward, _chunk_backward)
    )


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, softcap, chunk, compiled):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        valid = labels != IGNORE
        safe = torch.where(valid, labels, 0)
        forward = _compiled()[0] if compiled else _chunk_forward
        for s in range(0, n, chunk):
            lse[s : s + chunk], target[s : s + chunk] = forward(
                hidden[s : s + chunk], weight, safe[s : s + chunk], softcap
            )
        count = valid.sum().clamp(min=1)
        loss = ((lse - target) * valid).sum() / count
        ctx.save_for_backward(hidden, weight, safe, valid, lse, count)
        ctx.softcap, ctx.chunk, ctx.compiled = softcap, chunk, compiled
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, safe, valid, lse, count = ctx.saved_tensors
        softcap, chunk = ctx.softcap, ctx.chunk
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        scale = valid * (grad_out / count)
        backward = _compiled()[1] if ctx.compiled else _chunk_backward
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            g = backward(h, weight, safe[s : s + chunk], scale[s : s + chunk], lse[s : s + chunk], softcap)
            if grad_h is not None:
                grad_h[s : s + chunk] = g @ weight
            if grad_w is not None:
                grad_w += (g.t() @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None = 30.0,
    chunk: int = 512,
    compiled: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of softcap(hidden @ weight.T) against labels (-100 = ignored).

    hidden (tokens, dim), weight (vocab, dim), labels (tokens,): already shifted so that hidden[i]
    predicts labels[i].
    """
    return _ChunkedCE.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), softcap, chunk, compiled)


def causal_lm_loss(
    model, input_ids, labels, attention_mask=None, segment_ids=None, chunk: int = 512, body=None, media=None
):
    """Next-token loss of a g3n model on (batch, seq) ids with transformers-style unshifted labels.
    `body` runs the text model in place of model.model (a DistributedDataParallel wrapper of it);
    `media`: the batch's pixel_values / input_features (images and audio, in order)."""
    embeds = model.embed_inputs(input_ids, media) if media else None
    hidden = (body or model.model)(input_ids, attention_mask, None, None, segment_ids, embeds)
    shifted = labels[:, 1:].to(hidden.device)
    return chunked_cross_entropy(
        hidden[:, :-1],
        model.model.embed_tokens.weight,
        shifted,
        model.config.final_logit_softcapping,
        chunk,
        recompute.is_compiled(model.model),
    )
