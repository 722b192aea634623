"""One optimiser step's backward pass of CLIP training, with open_clip's gradient accumulation.

A contrastive loss is not a sum over samples: every image is scored against every caption of the
batch, so accumulating the gradients of small batches is not training with the large one. open_clip's
`--accum-freq` keeps the large batch's loss: the features of every micro-batch are computed first
without gradients, then each micro-batch is run again with gradients and its features put in place
of its cached ones, so each backward pass sees the whole batch. Two things are done better here:
the learned temperature (and SigLIP's bias) get their gradient once per step, not once per
micro-batch (open_clip scales theirs by accum_freq), and DDP all-reduces once per step, not after
every micro-batch (unless its static_graph is on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def _split(outputs) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """open_clip's CLIP returns (image features, text features, logit scale[, logit bias])."""
    return (outputs[0], outputs[1]), tuple(outputs[2:])


def backward_step(
    model: torch.nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    images: torch.Tensor,
    texts: torch.Tensor,
    accum_freq: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Gradients of the loss of this worker's batch, left in `.grad`; returns the loss (detached).

    With `accum_freq` > 1 the batch is run as that many micro-batches (activations of one at a
    time), and the gradients equal one pass over the whole batch, up to float rounding."""
    if accum_freq == 1:
        with autocast():
            features, scale = _split(model(images, texts))
            loss = loss_fn(*features, *scale)
        loss.backward()
        return loss.detach()
    image_chunks, text_chunks = images.chunk(accum_freq), texts.chunk(accum_freq)
    if len(image_chunks) != accum_freq:
        raise ValueError(f"a batch of {len(images)} cannot be split into {accum_freq} micro-batches")
    plain = getattr(model, "module", model)  # past DDP: a forward without gradients needs none of its hooks
    with torch.no_grad(), autocast():
        cached = [_split(plain(i, t))[0] for i, t in zip(image_chunks, text_chunks, strict=True)]
    last = accum_freq - 1
    # DDP's static_graph breaks under no_sync (an internal assert, then gradients silently not reduced:
    # pytorch/pytorch#143580): with it, every micro-batch is reduced, as open_clip does
    deferred = hasattr(model, "no_sync") and not getattr(model, "static_graph", False)
    for j, (image_chunk, text_chunk) in enumerate(zip(image_chunks, text_chunks, strict=True)):
        sync = model.no_sync() if deferred and j != last else contextlib.nullcontext()
        with sync:
            with autocast():
                live, scale = _split(model(image_chunk, text_chunk))
                if j != last:  # the temperature's gradient once, not accum_freq times (still used: DDP's static graph)
                    scale = tuple(s.detach() + 0 * s for s in scale)
                features = [
                    torch.cat([*(c[k] for c in cached[:j]), live[k], *(c[k] for c in cached[j + 1 :])]) for k in (0, 1)
                ]
                loss = loss_fn(*features, *scale)
            loss.backward()
    return loss.detach()
