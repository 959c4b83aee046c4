"""normbench's BatchNorm kernel.

- :mod:`~normbench.kernels.reference`: the specification, in plain torch
  operations (forward in training and eval, hand-derived backward); every faster
  kernel is tested against it.
- :mod:`~normbench.kernels.function`: the autograd glue
  (:class:`~normbench.kernels.function.BatchNormFunction`) and the functional
  :func:`batch_norm`, a drop-in for ``torch.nn.functional.batch_norm``.

Normalization layers call :func:`batch_norm` (or :func:`batch_norm_train` when
they need the batch statistics) and never the kernel directly, so swapping the
kernel touches nothing above this package.
"""

from normbench.kernels.function import BatchNormFunction, batch_norm, batch_norm_train

__all__ = ["BatchNormFunction", "batch_norm", "batch_norm_train"]
