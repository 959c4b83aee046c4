"""``batch_renorm``: Batch Renormalization (Ioffe 2017, Algorithm 1).

In training, each channel is normalised with the batch's statistics and then
corrected towards the running ones::

    sigma_B = sqrt(var_B + eps)                      (biased batch variance)
    r = stop_gradient(clip(sigma_B / sigma, 1/r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = weight * ((x - mu_B) / sigma_B * r + d) + bias
    mu += momentum * (mu_B - mu);  sigma += momentum * (sigma_B - sigma)

and in eval ``y = weight * (x - mu) / sigma + bias``, so training and inference
agree once the clips stop binding. The running statistics are a mean and a
standard deviation (buffers ``running_mean`` and ``running_std``; ``sigma``
already contains eps).

The running averages use torch's BatchNorm formula, ``running = (1 - momentum) *
running + momentum * batch`` (``lerp``); the default ``momentum=0.01`` is ten times
smaller than torch's 0.1, so their memory is about ``1 / momentum`` = 100 steps
instead of 10: smoother, and staler after a short run.

As in the paper, training starts as plain BatchNorm (``r_max = 1``,
``d_max = 0``) for ``warmup_steps`` steps, while the running statistics are
still poor, then the limits widen linearly to ``r_max`` and ``d_max`` over
``ramp_steps`` steps (:meth:`BatchRenorm.renorm_limits`). The layer counts in
steps; a run's config gives them as shares of its training steps too
(``norm.warmup_fraction``, ``norm.ramp_fraction``), which :func:`schedule_steps`
turns into steps before the model is built.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from normbench.kernels import BACKENDS, batch_norm, batch_norm_stats, batch_norm_train
from normbench.norms.registry import register_norm
from normbench.schema import RENORM_PHASES

__all__ = ["BatchRenorm", "BatchRenorm2d", "ramp_end_step", "schedule_steps"]


def schedule_steps(kwargs: dict[str, Any], total_steps: int) -> dict[str, Any]:
    """A norm's keyword arguments with Batch Renorm's schedule in steps, as the layer takes
    it: each phase given as a share of the run's ``total_steps`` (``warmup_fraction``,
    ``ramp_fraction``) becomes ``warmup_steps``/``ramp_steps``, a count given wins over
    its phase's share. The phases' ends are rounded (half up) from their cumulative
    shares, so warm-up plus ramp never exceeds the run when the shares sum to at most 1.
    Arguments without the share keys come back as they are; a phase whose share and
    count are both null is a ValueError."""
    if not any(share in kwargs for share, _ in RENORM_PHASES):
        return kwargs
    out = {k: v for k, v in kwargs.items() if k not in {share for share, _ in RENORM_PHASES}}
    start = 0  # where the phase starts, in steps
    shares: float | None = 0.0  # the phases' shares so far, while all were given as shares
    for share, count in RENORM_PHASES:
        if share not in kwargs and count not in kwargs:
            continue  # a variant without this phase
        steps, fraction = kwargs.get(count), kwargs.get(share)
        if steps is None and fraction is None:
            raise ValueError(f"{count} and {share} are both null: set one of them")
        if steps is None and shares is not None:
            shares += fraction
            steps = _rounded(shares, total_steps) - start
        elif steps is None:
            steps = _rounded(fraction, total_steps)
        else:
            shares = None
        out[count] = steps
        start += steps
    return out


def ramp_end_step(kwargs: dict[str, Any]) -> int | None:
    """The step from which the limits hold their values (``warmup_steps + ramp_steps`` of
    arguments in steps: :func:`schedule_steps`'); None for a variant without them."""
    if kwargs.get("warmup_steps") is None or kwargs.get("ramp_steps") is None:
        return None
    return kwargs["warmup_steps"] + kwargs["ramp_steps"]


def _rounded(share: float, total_steps: int) -> int:
    return math.floor(share * total_steps + 0.5)


@register_norm("batch_renorm")
class BatchRenorm(nn.Module):
    """Batch Renormalization over any ``(N, C, *)`` input (see the module docstring).

    ``momentum``: the running averages' update, ``running = (1 - momentum) * running +
    momentum * batch`` as in ``torch.nn.BatchNorm2d`` (momentum 0.1 there); 0.01 here
    remembers about 100 steps rather than 10. ``warmup_steps``/``ramp_steps``: the
    correction's schedule in training steps (:func:`schedule_steps` gives them from a
    run's shares).

    In training the kernel normalises with the batch's statistics and applies
    ``weight * r`` and ``weight * d + bias`` as its affine parameters (r and d constants
    to autograd, as in the paper), so the layer is one kernel each way; ``relu=True``
    fuses the ReLU after it too.
    """

    prefers_channels_last = True  # memory_format=auto: channels_last on the CPU (faster)

    #: Models ask for the fused layer where they apply norm then ReLU (NormSpec).
    fuses_relu = True

    @staticmethod
    def norm_batch_size(per_process: int, world: int, kwargs: dict) -> int:
        """The process's own batch: its statistics are the batch's, as BatchNorm's (it is
        not a subclass of torch's ``_BatchNorm``, which NormSpec's default looks for)."""
        return per_process

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 500,
        ramp_steps: int = 2000,
        affine: bool = True,
        device=None,
        dtype=None,
        backend: str = "auto",
        relu: bool = False,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown norm backend {backend!r}; valid: {', '.join(BACKENDS)}")
        self.backend = backend
        self.relu = relu
        if r_max < 1.0 or d_max < 0.0:
            raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        if warmup_steps < 0 or ramp_steps < 0:
            raise ValueError(
                f"need warmup_steps >= 0 and ramp_steps >= 0, got {warmup_steps}, {ramp_steps}"
            )
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = warmup_steps
        self.ramp_steps = ramp_steps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_std", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_std.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def renorm_limits(self, step: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The ``(r_max, d_max)`` in force at training ``step`` (default: the next step).

        Steps count from 0: ``step`` is ``num_batches_tracked`` before the step's
        increment. Plain BatchNorm ``(1, 0)`` before ``warmup_steps``, then linear
        from ``(1, 0)`` at ``warmup_steps`` to ``(r_max, d_max)`` at
        ``warmup_steps + ramp_steps``. Returned as 0-d tensors on the buffers'
        device, so a training step never waits for the GPU to read the counter.
        """
        if step is None:
            step = self.num_batches_tracked
        step = torch.as_tensor(step, device=self.num_batches_tracked.device)
        if self.ramp_steps == 0:
            t = (step >= self.warmup_steps).float()
        else:
            t = ((step - self.warmup_steps) / self.ramp_steps).float().clamp(0.0, 1.0)
        return 1.0 + t * (self.r_max - 1.0), t * self.d_max

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            # sigma already contains eps, hence eps=0 here
            variance = self.running_std.square()
            return batch_norm(
                input,
                self.running_mean,
                variance,
                self.weight,
                self.bias,
                eps=0.0,
                backend=self.backend,
                relu=self.relu,
            )

        if input.numel() == 0:  # no statistics: as torch's BatchNorm, count it, change nothing
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
            return batch_norm_train(
                input, self.weight, self.bias, self.eps, self.backend, self.relu
            )[0]
        r_max, d_max = self.renorm_limits()
        mean, invstd = batch_norm_stats(input, self.eps, self.backend)
        with torch.no_grad():
            batch_std = invstd.reciprocal()
            running_std = self.running_std.to(batch_std.dtype)
            running_mean = self.running_mean.to(mean.dtype)
            r_max, d_max = r_max.to(batch_std.dtype), d_max.to(batch_std.dtype)
            r = torch.clamp(batch_std / running_std, r_max.reciprocal(), r_max)
            d = torch.clamp((mean - running_mean) / running_std, -d_max, d_max)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_std.lerp_(batch_std.to(self.running_std.dtype), self.momentum)
            self.num_batches_tracked.add_(1)

        # y = weight * (xhat * r + d) + bias: BatchNorm with weight * r and weight * d + bias
        # as its affine parameters, r and d constants to autograd (the affine parameters see
        # both); the kernel gives BatchNorm's gradient through mu_B and sigma_B.
        # The parameters flattened: any shape of C values, as BatchNorm takes them.
        scale, shift = r, d
        if self.weight is not None:
            scale = self.weight.reshape(-1) * r
            shift = self.weight.reshape(-1) * d
        if self.bias is not None:
            shift = shift + self.bias.reshape(-1)
        return batch_norm_train(input, scale, shift, self.eps, self.backend, self.relu)[0]

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
            f"ramp_steps={self.ramp_steps}, affine={self.affine}"
        ) + (", relu=True" if self.relu else "")


class BatchRenorm2d(BatchRenorm):
    """Batch Renormalization for ``(N, C, H, W)`` input."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
