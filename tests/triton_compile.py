"""Compile normbench's Triton kernels for a CUDA GPU with triton's own compiler, no GPU needed.

Triton's interpreter (how the kernels' tests run without a GPU) executes the kernels' Python
in numpy: it never type-checks them as the compiler does (loop-carried types, scalar and
block mixes, float64 arguments, what a constexpr may be). This script runs the kernels'
API (:mod:`normbench.kernels.triton_launch`) on CPU tensors over a set of cases with each
launch intercepted, not executed, and compiles every distinct launch (kernel, argument
types, constexprs, warps) to a cubin for ``--arch`` (default sm_90, the H100/H200) with
``triton.compile`` and the ``ptxas`` in triton's wheel. Prints one line per failure, a
``compiled N of M kernels`` line and the kernels' names; exits 1 if any failed.

Run it without ``TRITON_INTERPRET`` (it unsets the variable before importing triton):
``python tests/triton_compile.py [--arch 90] [--quick]``. ``--quick`` takes fewer cases
(every kernel, both layouts, float32 and float64, with and without the fused ReLU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from normbench.kernels import triton_launch as tk  # noqa: E402

TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
}


def _type(param, value) -> str:
    """The signature type triton would give ``value`` for ``param``."""
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if param.annotation_type:  # an annotated scalar (eps: tl.float64)
        return param.annotation_type
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no triton type for {param.name}={value!r}")


class Launches:
    """Every distinct launch made inside the block, recorded and not run."""

    def __init__(self):
        self.seen: dict[tuple, tuple] = {}

    def __enter__(self):
        self._run = JITFunction.run
        seen = self.seen

        def record(fn, *args, grid, warmup, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            bound = dict(zip(fn.arg_names, args, strict=False), **kwargs)
            signature, constexprs = {}, {}
            for param in fn.params:
                value = bound[param.name]
                if param.is_constexpr:
                    signature[param.name] = "constexpr"
                    constexprs[param.name] = value
                else:
                    signature[param.name] = _type(param, value)
            key = (
                fn.__name__,
                tuple(signature.items()),
                tuple((k, repr(v)) for k, v in constexprs.items()),
                tuple(sorted(options.items())),
            )
            seen.setdefault(key, (fn, signature, constexprs, options))

        JITFunction.run = record
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run


def cases(quick: bool):
    """The kernels' API called as the operators call it: (label, thunk)."""
    shapes = [(4, 3, 5, 5), (6, 5), (2, 3, 4, 3, 2)] if not quick else [(4, 3, 5, 5), (6, 5)]
    dtypes = [torch.float32, torch.float64] + ([] if quick else [torch.float16, torch.bfloat16])
    for shape in shapes:
        for cl in (False, True) if len(shape) >= 4 else (False,):
            for dtype in dtypes:
                for relu in (False, True):
                    for affine in (True, False) if not quick else (True,):
                        yield (shape, cl, dtype, relu, affine)


def call(shape, cl, dtype, relu, affine) -> None:
    x = torch.randn(shape).to(dtype)
    if cl:
        fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        x = x.contiguous(memory_format=fmt)
    C = shape[1]
    acc = torch.promote_types(dtype, torch.float32)
    w = torch.ones(C, dtype=dtype) if affine else None
    b = torch.zeros(C, dtype=dtype) if affine else None
    mean = torch.zeros(C, dtype=acc)
    invstd = torch.ones(C, dtype=acc)
    tk.forward_train(x, w, b, 1e-5, relu)
    tk.backward(torch.randn_like(x), x, w, mean, invstd, b, relu)
    tk.forward_eval(x, torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype), w, b, 1e-5, relu)
    tk.update_running_stats(
        torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype), mean, invstd, 0.1, 1e-5, 10
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    args = parser.parse_args(argv)
    assert not tk.interpreted(), "TRITON_INTERPRET must be unset"
    target = GPUTarget("cuda", args.arch, 32)
    with Launches() as launches:
        for case in cases(args.quick):
            call(*case)
    start = time.perf_counter()
    failed = 0
    for key, (fn, signature, constexprs, options) in launches.seen.items():
        try:
            triton.compile(ASTSource(fn, signature, constexprs), target=target, options=options)
        except Exception as error:  # report every failing kernel, not only the first
            failed += 1
            first = str(error).strip().splitlines()
            print(f"FAILED {key[0]} {constexprs} {options}: {first[-1] if first else error!r}")
    seconds = time.perf_counter() - start
    kernels = sorted({key[0] for key in launches.seen})
    print(
        f"compiled {len(launches.seen) - failed} of {len(launches.seen)} kernels for sm_{args.arch}"
        f" ({len(kernels)} functions, triton {triton.__version__}, {seconds:.1f} s)"
    )
    print("functions:", " ".join(kernels))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
