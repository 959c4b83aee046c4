"""Per-layer BatchNorm diagnostics: how well each layer's running statistics stand for
the statistics it meets, measured at the end of every epoch.

For every layer with running statistics (found by their buffers, as
:func:`normbench.inference.running_stat_layers` finds them), on a copy of the model in
training mode, over ``batches`` fixed batches of training images at the training
batch size (no augmentation; the same images every epoch, chosen once per run from its
seed; :func:`batch_count`):

- the **true statistics** of the epoch's weights, as PreciseBN estimates them (Wu &
  Johnson 2021): per channel the average of the batches' means, ``mu``, and of their
  unbiased variances, ``var``;
- how far the **running** ones are from them, scale-free, averaged over channels:
  ``mean_shift`` = mean |running_mean - mu| / sqrt(var + eps) (the shift in units of the
  true standard deviation) and ``var_log_ratio`` = mean |ln(V / (var + eps))|, where V is
  what the layer divides by squared in eval mode (``running_var + eps``; Batch Renorm's
  ``running_std`` squared, which holds eps already): 0 when they agree, ln 2 = 0.69 when
  one is twice the other, either way;
- the **spread of the batches' statistics** around the true ones: ``batch_mean_spread``
  = mean std_b(batch mean) / sqrt(var + eps) (about 1 / sqrt(values per batch and
  channel) for independent values) and ``batch_var_spread`` = mean std_b(batch
  variance) / (var + eps) (about sqrt(2 / (values - 1)) for Gaussian ones); std over
  the batches with Bessel's correction, NaN for a single batch;
- the **train/eval gap** on the probe batch (the first of those batches): the layer's
  output in training mode against its output in eval mode on the same input (the input
  it receives in the training-mode forward), per channel the RMS difference over the
  RMS deviation of the training-mode output from its mean, averaged over the channels
  whose training-mode output varies (a channel whose weight is 0 has no scale to
  measure by): 0 when the running statistics equal the batch's.

A layer normalises each batch (Ghost BatchNorm's virtual batches too) as a whole here:
the spread is that of the training batch. The run's model is not touched: its copy's
buffers are put back after every batch, so running statistics and step counters (Batch
Renorm's schedule) stay as training left them.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from normbench.data import DataSplits
from normbench.inference import running_stat_layers
from normbench.kernels import batch_norm_stats

#: Training images the diagnostics average over each epoch (cut into batches of the training
#: batch size; fewer when the training set is smaller): forward passes only, few enough to
#: run every epoch of a small data set's run (their cost: benchmarks/README.md).
IMAGES = 128

#: The fewest batches measured, so that the batches' spread is defined at large batch sizes.
MIN_BATCHES = 2

#: eps of a layer that declares none.
DEFAULT_EPS = 1e-5


def batch_count(num_train: int, batch_size: int) -> int:
    """Batches measured per epoch: ``IMAGES`` images, at least ``MIN_BATCHES`` batches,
    at most one pass over the training set."""
    return max(1, min(max(MIN_BATCHES, IMAGES // batch_size), num_train // batch_size))


def fixed_batches(data: DataSplits, batch_size: int, seed: int) -> list[Tensor]:
    """The run's measured batches (:func:`batch_count`): training images in an order
    drawn from ``seed``, the same at every epoch; the first is the probe batch."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.num_train, generator=generator).to(data.train_x.device)
    count = batch_count(data.num_train, batch_size)
    return [data.train_x[order[k * batch_size : (k + 1) * batch_size]] for k in range(count)]


def eval_variance(layer: nn.Module) -> Tensor | None:
    """What ``layer`` divides by, squared, in eval mode (None: it keeps no variance)."""
    running_var = getattr(layer, "running_var", None)
    if isinstance(running_var, Tensor):
        return running_var.double() + layer_eps(layer)
    running_std = getattr(layer, "running_std", None)  # Batch Renorm: sigma holds eps
    if isinstance(running_std, Tensor):
        return running_std.double().square()
    return None


def layer_eps(layer: nn.Module) -> float:
    eps = getattr(layer, "eps", None)
    return float(eps) if isinstance(eps, int | float) else DEFAULT_EPS


def _channel_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def batch_statistics(mean: Tensor, invstd: Tensor, count: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per batch and channel the mean and unbiased variance, in float64, from the
    ``(mean, invstd)`` of normbench's BatchNorm kernel (``batch_norm_stats``: a tenth of
    ``torch.var_mean``'s time on the CPU) over ``count`` values per channel: the variance
    from ``invstd`` = 1 / sqrt(biased variance + eps), exact to float32's precision
    relative to variance + eps, the scale every measure takes it at."""
    biased = (invstd.double().pow(-2) - eps).clamp(min=0.0)
    return mean.double(), biased * count / max(count - 1, 1)


def statistics_measures(
    running_mean: Tensor,
    running_variance: Tensor | None,
    batch_means: Tensor,
    batch_vars: Tensor,
    eps: float,
) -> dict[str, float]:
    """The four running-vs-true and spread measures of one layer (module docstring), in
    float64: ``running_variance`` as the layer divides by it (:func:`eval_variance`),
    ``batch_means``/``batch_vars`` (batches x channels) each batch's per-channel mean and
    unbiased variance."""
    means, variances = batch_means.double(), batch_vars.double()
    true_mean, true_var = means.mean(0), variances.mean(0) + eps
    std = true_var.sqrt()
    shift = ((running_mean.double() - true_mean).abs() / std).mean().item()
    log_ratio = (
        math.nan
        if running_variance is None
        else (running_variance.double() / true_var).log().abs().mean().item()
    )
    several = len(means) > 1
    return {
        "mean_shift": shift,
        "var_log_ratio": log_ratio,
        "batch_mean_spread": (means.std(0) / std).mean().item() if several else math.nan,
        "batch_var_spread": (variances.std(0) / true_var).mean().item() if several else math.nan,
    }


def output_gap(train_out: Tensor, eval_out: Tensor) -> float:
    """The train/eval gap of one layer's outputs (module docstring): channel-averaged RMS
    difference relative to the training-mode output's RMS deviation; NaN when no channel's
    training-mode output varies."""
    dims = _channel_dims(train_out)
    rms = (train_out - eval_out).square().mean(dims).sqrt()
    scale = train_out.var(dims, correction=0).sqrt()
    varies = scale > 0
    if not bool(varies.any()):
        return math.nan
    return (rms[varies].double() / scale[varies]).mean().item()


@torch.no_grad()
def measure(model: nn.Module, batches: Sequence[Tensor]) -> list[dict[str, object]]:
    """One row per layer with running statistics, in the model's order: ``layer`` (its
    module name), ``channels``, ``batches`` and the measures (module docstring), with
    ``model`` as it is now; the model is left as it was. No layer: no rows."""
    if not batches or not running_stat_layers(model):
        return []
    probe = copy.deepcopy(model).train()
    wanted = {id(m) for m in running_stat_layers(probe)}
    layers = [(name, m) for name, m in probe.named_modules() if id(m) in wanted]
    # the running statistics (and Batch Renorm's step) as training left them, put back
    # after each batch
    saved = [(buffer, buffer.clone()) for buffer in probe.buffers()]
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name, _ in layers}
    probed: dict[str, tuple[Tensor, Tensor]] = {}  # the probe batch's input and output

    def hook(name: str):
        found = seen[name]

        def record(module, args, output):
            x = args[0]
            found.append(batch_norm_stats(x, layer_eps(module)))
            if len(found) == 1:  # the probe batch
                probed[name] = (x.clone(), output.clone())

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers]
    try:
        for xb in batches:
            probe(xb)
            for buffer, value in saved:
                buffer.copy_(value)
    finally:
        for handle in handles:
            handle.remove()
    rows: list[dict[str, object]] = []
    for name, layer in layers:
        x, train_out = probed[name]
        count = x.numel() // x.shape[1]
        mean, invstd = (torch.stack(part) for part in zip(*seen[name], strict=True))
        means, variances = batch_statistics(mean, invstd, count, layer_eps(layer))
        if getattr(layer, "pool", False):
            # the gap of the norm's own output, as without the pooling fused into it
            layer.pool = False
            train_out = layer.train()(x)
            for buffer, value in saved:
                buffer.copy_(value)
        eval_out = layer.eval()(x)  # (a hook no more: the handles are removed)
        rows.append(
            {
                "layer": name,
                "channels": means.shape[1],
                "batches": len(means),
                **statistics_measures(
                    layer.running_mean, eval_variance(layer), means, variances, layer_eps(layer)
                ),
                "train_eval_gap": output_gap(train_out, eval_out),
            }
        )
    return rows


class EpochDiagnostics:
    """The diagnostics of one run's ``model``: called with an epoch, the rows of
    :func:`measure` for the model as it is now, each with its ``epoch``, handed to
    ``write`` (the runner's: this module writes no file) when set. The batches are chosen
    on the first call (:func:`fixed_batches`); ``seconds``: the time measuring and writing."""

    def __init__(self, model: nn.Module, data: DataSplits, batch_size: int, seed: int):
        self.model, self.data, self.batch_size, self.seed = model, data, batch_size, seed
        self.batches: list[Tensor] | None = None
        self.write: Callable[[list[dict[str, object]]], None] | None = None
        self.seconds = 0.0

    @property
    def layers(self) -> int:
        """The model's layers with running statistics (0: nothing to measure)."""
        return len(running_stat_layers(self.model))

    def __call__(self, epoch: int) -> list[dict[str, object]]:
        clock = time.perf_counter()
        if self.batches is None:
            self.batches = fixed_batches(self.data, self.batch_size, self.seed)
        rows = [{"epoch": epoch, **row} for row in measure(self.model, self.batches)]
        if self.write is not None:
            self.write(rows)
        self.seconds += time.perf_counter() - clock
        return rows
