"""BatchNorm at inference: what the running averages stand for, measured two more ways.

A variant with running statistics (``custom_bn``, ``torch_bn``, ``ghost_bn``,
``batch_renorm``) normalises test images with population statistics, estimated during
training by exponential averages of the batches' statistics while the weights moved.
At the end of a run two other estimators are measured on the test set (Wu & Johnson
2021, "Rethinking 'Batch' in BatchNorm"):

- **precise**: the population statistics re-estimated with the final weights, as
  PreciseBN does: a true average of the per-batch means and (unbiased) variances over
  about ``images`` training images (:func:`precise_batches`: batches of the training
  batch size, at most one pass over the training set; a data-parallel run's is what one
  process's layers normalized over: ``build.local_batch``), no augmentation. Sized in
  images, not batches, so that every batch size averages as many: Wu & Johnson find
  ~10^4 images enough for the population statistics (``eval.precise_bn_images``);
- **batch statistics**: each test batch of the training batch size normalised with its
  own statistics, as a model that never switched to eval mode would.

Both work on a copy of the model: its running statistics are left as training made
them. Layers are found by their buffers (``running_mean``), not by name, so a new
variant with running statistics is measured too.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normbench.data import DataSplits, eval_batches, eval_step_size


def running_stat_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that normalise with running statistics in eval mode."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "running_mean", None), torch.Tensor) and hasattr(m, "momentum")
    ]


@torch.no_grad()
def precise_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose running statistics are the true average over ``batches``
    of each batch's statistics (forward passes in training mode, no gradients)."""
    estimate = copy.deepcopy(model)
    layers = running_stat_layers(estimate)
    for layer in layers:
        if isinstance(layer, _BatchNorm):
            # torch's cumulative average: momentum None averages by num_batches_tracked,
            # once per normalised batch (ghost BatchNorm's virtual batches included)
            layer.reset_running_stats()
            layer.momentum = None
    estimate.train()
    for k, xb in enumerate(batches):
        for layer in layers:
            if not isinstance(layer, _BatchNorm):
                # one update per forward (batch renormalization): 1/(k+1) makes the
                # exponential average a plain one
                layer.momentum = 1.0 / (k + 1)
        estimate(xb)
    return estimate.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Test accuracy of ``model`` as it is (train or eval mode), in batches of
    ``batch_size``; a last batch of one image joins the one before (BatchNorm cannot
    normalise a single value per channel)."""
    correct = 0
    batches = list(eval_batches(x, y, batch_size))
    if len(batches) > 1 and len(batches[-1][1]) == 1:
        (xa, ya), (xb, yb) = batches[-2], batches[-1]
        batches[-2:] = [(torch.cat([xa, xb]), torch.cat([ya, yb]))]
    for xb, yb in batches:
        correct += int((model(xb).argmax(1) == yb).sum())
    return correct / len(y)


def precise_batches(images: int, num_train: int, batch_size: int) -> int:
    """The training batches PreciseBN averages for ``images`` images: ``ceil(min(images,
    num_train) / batch_size)``, at most the full batches of one pass over the training set
    (the last partial batch is dropped, as in training)."""
    return min(-(-min(images, num_train) // batch_size), num_train // batch_size)


def training_batches(data: DataSplits, batch_size: int, count: int, seed: int):
    """``count`` training batches of ``batch_size`` (no augmentation, a fixed shuffle
    from ``seed``), at most one pass over the training set."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.num_train, generator=generator).to(data.train_x.device)
    full = data.num_train // batch_size
    for k in range(min(count, full)):
        yield data.train_x[order[k * batch_size : (k + 1) * batch_size]]


def measure(
    model: nn.Module,
    data: DataSplits,
    batch_size: int,
    eval_batch_size: int,
    precise_images: int,
    seed: int,
) -> dict[str, float]:
    """``test_acc_precise_bn`` and ``test_acc_batch_stats`` of a trained ``model``; {} when
    it has no running statistics. PreciseBN averages ``precise_images`` training images
    (:func:`precise_batches`). The model is left as it was."""
    if not running_stat_layers(model):
        return {}
    was_training = model.training
    try:
        count = precise_batches(precise_images, data.num_train, batch_size)
        precise = precise_statistics(model, training_batches(data, batch_size, count, seed))
        batch_stats = copy.deepcopy(model).train()
        return {
            # eval mode: the batch size changes nothing but the speed
            "test_acc_precise_bn": accuracy(
                precise, data.test_x, data.test_y, eval_step_size(eval_batch_size, data.test_x)
            ),
            "test_acc_batch_stats": accuracy(batch_stats, data.test_x, data.test_y, batch_size),
        }
    finally:
        model.train(was_training)
