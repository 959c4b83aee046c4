"""The norm, its ReLU and the 2x2 max-pooling after it in one layer (``pool=True``, handed out
by NormSpec.with_activation_pool): against torch's BatchNorm2d, ReLU and MaxPool2d in a row,
in float64 and float32, on the fused operators and on the paths that compose them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_contract import TORCH_TAKES_BIAS

from normbench.diagnostics import measure
from normbench.kernels import relu_pool_applies
from normbench.models import build_model
from normbench.norms import BatchNorm2d, NormSpec
from normbench.norms.syncbn import SyncBatchNorm

LAST = torch.channels_last
# odd planes (a last row or column no window pools), channels that fill no vector, one
# sample, one channel
SHAPES = [(6, 8, 6, 6), (3, 5, 7, 9), (2, 17, 5, 4), (1, 3, 2, 2), (4, 1, 3, 5), (5, 40, 4, 6)]


def ops():
    from normbench.kernels import ops as kernel_ops

    assert kernel_ops.library() is not None, "the C++ kernel did not build"
    return torch.ops.normbench


def composed(x, weight, bias, mean, invstd, dy, batch_stats=True):
    """torch's BatchNorm (batch statistics, or the constants given), ReLU, max_pool2d; and
    the gradients of ``(y * dy).sum()``."""
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    if batch_stats:
        z = F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)
    else:
        shape = (1, -1, 1, 1)
        z = (x - mean.view(shape)) * invstd.view(shape) * weight.view(shape) + bias.view(shape)
    y = F.max_pool2d(torch.relu(z), 2)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad, bias.grad


def inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=generator, dtype=dtype) * 2 + 0.3).contiguous(
        memory_format=LAST
    )
    weight = torch.randn(c, generator=generator, dtype=dtype)
    bias = torch.randn(c, generator=generator, dtype=dtype)
    return x, weight, bias


@pytest.mark.parametrize("shape", SHAPES)
def test_operators_match_batch_norm_relu_max_pool_in_float64(shape):
    lib = ops()
    x, weight, bias = inputs(shape, torch.float64)
    mean, invstd = lib.batch_norm_stats(x, 1e-5)
    out, choice = lib.relu_pool_forward(x, weight, bias, mean, invstd)
    dy = torch.randn_like(out)
    dx, dweight, dbias = lib.relu_pool_backward(dy, x, choice, weight, bias, mean, invstd)
    expected = composed(x, weight, bias, mean, invstd, dy)
    for got, want in zip((out, dx, dweight, dbias), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert out.is_contiguous(memory_format=LAST) and dx.is_contiguous(memory_format=LAST)
    n, c, h, w = shape
    assert choice.dtype == torch.uint8 and choice.shape == (n, h // 2, w // 2, c)


@pytest.mark.parametrize("shape", SHAPES)
def test_operators_match_in_float32_within_its_rounding(shape):
    lib = ops()
    x, weight, bias = inputs(shape, torch.float32, seed=1)
    mean, invstd = lib.batch_norm_stats(x, 1e-5)
    out, choice = lib.relu_pool_forward(x, weight, bias, mean, invstd)
    dy = torch.randn_like(out)
    got = (out, *lib.relu_pool_backward(dy, x, choice, weight, bias, mean, invstd))
    # the float64 composition of the same float32 values: the truth both round from
    want = composed(x.double(), weight.double(), bias.double(), mean, invstd, dy.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-4)


def test_constant_statistics_give_the_eval_gradient():
    lib = ops()
    x, weight, bias = inputs((4, 6, 6, 8), torch.float64, seed=2)
    mean = torch.randn(6, dtype=torch.float64)
    invstd = torch.rand(6, dtype=torch.float64) + 0.5
    out, choice = lib.relu_pool_forward(x, weight, bias, mean, invstd)
    dy = torch.randn_like(out)
    got = (out, *lib.relu_pool_backward(dy, x, choice, weight, bias, mean, invstd, False))
    want = composed(x, weight, bias, mean, invstd, dy, batch_stats=False)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_ties_nan_and_dead_windows_send_the_gradient_where_torch_does():
    """Equal maxima: the first in the window takes the gradient (max_pool2d's rule); a NaN
    takes it; a window whose maximum the ReLU zeroed passes none."""
    lib = ops()
    nan = float("nan")
    windows = [
        [2.0, 2.0, 1.0, 2.0],  # a tie: the first
        [1.0, 3.0, 3.0, 0.5],  # a tie after a smaller one
        [-1.0, -2.0, -0.5, -3.0],  # dead
        [0.0, -1.0, 0.0, -2.0],  # a maximum of exactly 0: dead
        [1.0, nan, 2.0, 0.0],  # NaN
        [-1.0, -1.0, nan, 5.0],  # NaN then larger: the NaN stays
    ]
    # one channel, one 2x2 window per sample, the statistics constants (identity norm)
    x = torch.tensor(windows, dtype=torch.float64).view(len(windows), 1, 2, 2)
    x = x.contiguous(memory_format=LAST)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    out, choice = lib.relu_pool_forward(x, one, zero, zero, one)
    dy = torch.arange(1.0, len(windows) + 1, dtype=torch.float64).view(-1, 1, 1, 1)
    dx, _, _ = lib.relu_pool_backward(dy, x, choice, one, zero, zero, one, False)
    want_y, want_dx, _, _ = composed(x, one, zero, zero, one, dy, batch_stats=False)
    torch.testing.assert_close(out, want_y, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(dx, want_dx, equal_nan=True, rtol=0, atol=0)
    assert choice.flatten().tolist() == [0, 1, 255, 255, 1, 2]


def _forward(*, take=lambda x: x, statistics=None):
    return lambda lib, x_, c, g: lib.relu_pool_forward(
        take(x_), None, None, *(statistics(x_) if statistics else stats(x_))
    )


def _backward(grad=lambda g: g, choice=lambda c: c):
    return lambda lib, x, c, g: lib.relu_pool_backward(grad(g), x, choice(c), None, None, *stats(x))


@pytest.mark.parametrize(
    "call, message",
    [
        (_forward(take=lambda x: x.contiguous()), "channels_last"),
        (_forward(take=lambda x: x.int()), "not implemented for 'Int'"),
        (_forward(take=lambda x: x[:, :, :1]), "2x2"),
        (_forward(statistics=lambda x: (stats(x)[0][:2], stats(x)[1])), "mean"),
        (_backward(grad=lambda g: g[:, :, :1]), "grad_out"),
        (_backward(grad=lambda g: g.double()), "dtype"),
        (_backward(choice=lambda c: c.int()), "choice"),
        (_backward(choice=lambda c: c[:1]), "choice"),
        (_backward(choice=lambda c: c.transpose(1, 2)), "choice"),
    ],
)
def test_operators_refuse_tensors_they_cannot_read(call, message):
    """Every tensor is checked before a pointer is read: a clear RuntimeError, no crash."""
    lib = ops()
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=LAST)
    out, choice = lib.relu_pool_forward(x, None, None, *stats(x))
    with pytest.raises(RuntimeError, match=message):
        call(lib, x, choice, torch.randn_like(out))


def stats(x):
    return x.mean((0, 2, 3)), (x.var((0, 2, 3), correction=0) + 1e-5).rsqrt()


def pair(dtype, momentum=0.1, bias=True, **kwargs):
    """The fused layer and torch's BatchNorm2d, ReLU and MaxPool2d, with equal parameters
    (``bias=False``: torch's keyword, a weight without a bias)."""
    no_bias = {} if bias else {"bias": False}
    fused = BatchNorm2d(8, momentum=momentum, relu=True, pool=True, **no_bias, **kwargs)
    fused = fused.to(dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.randn(8) * 0.5 + 1)
        if bias:
            fused.bias.copy_(torch.randn(8) * 0.5)
    norm = nn.BatchNorm2d(8, momentum=momentum, **no_bias).to(dtype)
    norm.load_state_dict(fused.state_dict())
    return fused, nn.Sequential(norm, nn.ReLU(), nn.MaxPool2d(2))


def steps(layer, xs, layout):
    """Training steps over ``xs``, then an eval-mode forward and backward: every output,
    gradient and buffer along the way."""
    seen = []
    layer.train()
    norm = layer[0] if isinstance(layer, nn.Sequential) else layer
    for x in xs:
        x = x.clone().contiguous(memory_format=layout).requires_grad_()
        y = layer(x)
        y.backward(torch.ones_like(y) + y.detach())  # a gradient that differs by position
        grads = [p.grad.clone() for p in norm.parameters()]  # (weight, and bias where one)
        seen += [y, x.grad, *grads, *norm.buffers()]
    layer.eval()
    x = xs[0].clone().contiguous(memory_format=layout).requires_grad_()
    y = layer(x)
    y.sum().backward()
    return seen + [y, x.grad]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    "layout, backend, dtype",
    [
        (LAST, "auto", torch.float64),  # the fused operators
        (torch.contiguous_format, "auto", torch.float64),  # composed: a layout they do not read
        (LAST, "reference", torch.float64),  # composed: another backend
    ],
)
def test_layer_matches_torch_batch_norm_relu_max_pool(momentum, layout, backend, dtype):
    torch.manual_seed(0)
    fused, plain = pair(dtype, momentum, backend=backend)
    xs = [torch.randn(4, 8, 7, 6, dtype=dtype) * 2 + 1 for _ in range(3)]
    x0 = xs[0].contiguous(memory_format=layout)
    assert relu_pool_applies(x0, backend) == (layout == LAST and backend == "auto")
    for got, want in zip(steps(fused, xs, layout), steps(plain, xs, layout), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.skipif(not TORCH_TAKES_BIAS, reason="this torch's BatchNorm2d has no bias keyword")
@pytest.mark.parametrize("layout", [LAST, torch.contiguous_format])
def test_layer_without_a_bias_matches_torchs(layout):
    torch.manual_seed(0)
    fused, plain = pair(torch.float64, bias=False)
    assert fused.bias is None and list(fused.state_dict()) == list(plain[0].state_dict())
    xs = [torch.randn(4, 8, 7, 6, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    for got, want in zip(steps(fused, xs, layout), steps(plain, xs, layout), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_fuses_with_the_compositions_results(dtype):
    """bfloat16 and float16 input (the convolutions' output under autocast) takes the
    fused operators, with float32 parameters and statistics: the same outputs and running
    statistics as the kernel's norm-ReLU layer then F.max_pool2d, bit for bit, and the
    same gradients (summed in another order: within float32's rounding, and dx within one
    rounding of its dtype), over training steps and in eval mode."""
    torch.manual_seed(0)
    fused = BatchNorm2d(40, relu=True, pool=True)  # channels that fill vectors and a tail
    with torch.no_grad():
        fused.weight.copy_(torch.randn(40) * 0.5 + 1)
        fused.bias.copy_(torch.randn(40) * 0.5)
    plain = copy.deepcopy(fused)
    plain.pool = False
    xs = [(torch.randn(4, 40, 7, 6) * 2 + 1).to(dtype) for _ in range(3)]
    assert relu_pool_applies(xs[0].contiguous(memory_format=LAST), "auto")

    def run(layer, pool):
        seen = []
        for x, training in zip(xs, (True, True, False), strict=True):
            layer.train(training)
            x = x.clone().contiguous(memory_format=LAST).requires_grad_()
            y = layer(x)
            y = F.max_pool2d(y, 2) if pool else y
            y.backward((torch.ones_like(y) + y.detach()) * 0.25)
            seen.append((y, x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
            seen.append(tuple(b.clone() for b in layer.buffers()))
            layer.weight.grad = layer.bias.grad = None
        return seen

    exact = torch.finfo(dtype).eps
    for (got_y, got_dx, *got_p), (want_y, want_dx, *want_p) in zip(
        run(fused, False)[::2], run(plain, True)[::2], strict=True
    ):
        assert got_y.dtype == dtype and got_dx.dtype == dtype
        torch.testing.assert_close(got_y, want_y, rtol=0, atol=0)
        torch.testing.assert_close(got_dx, want_dx, rtol=exact, atol=exact)
        for got, want in zip(got_p, want_p, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(run(fused, False)[1::2], run(plain, True)[1::2], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [1, 40])
def test_reduced_precision_values_that_round_alike_tie_as_in_the_composition(dtype, channels):
    """A window's z of 1001, 1001.0078, 1000.5 and 999 (bias 1000) differ in float32, but
    the norm layer's output rounds them alike (all 1000 in bfloat16, the first two 1001 in
    float16): max_pool2d takes the first of them, and so does the fused layer, and the
    gradient goes there (the vector path and the scalar one)."""
    lib = ops()
    window = torch.tensor([1.0, 1.0078125, 0.5, -1.0]).reshape(1, 1, 2, 2)
    x = window.expand(1, channels, 2, 2).to(dtype).contiguous(memory_format=LAST)
    one, zero = torch.ones(channels), torch.zeros(channels)
    out, choice = lib.relu_pool_forward(x, one, one * 1000, zero, one)
    y = lib.batch_norm_eval(x, zero, one, one, one * 1000, 0.0, True)
    want, index = F.max_pool2d(y, 2, return_indices=True)
    assert index.flatten().tolist() == [0] * channels
    assert choice.flatten().tolist() == [0] * channels
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    dx, _, _ = lib.relu_pool_backward(torch.ones_like(out), x, choice, one, one, zero, one, False)
    expected = torch.zeros_like(x)
    expected[:, :, 0, 0] = 1
    torch.testing.assert_close(dx, expected, rtol=0, atol=0)


def test_pool_needs_relu_and_a_forward_that_applies_it():
    with pytest.raises(ValueError, match="needs relu=True"):
        BatchNorm2d(4, pool=True)

    class Own(BatchNorm2d):  # a forward of its own, which would not pool
        def forward(self, input):
            return input

    with pytest.raises(ValueError, match="does not fuse pooling"):
        Own(4, relu=True, pool=True)

    class Declared(BatchNorm2d):  # ... unless the class whose forward runs says it pools
        fuses_pool = True

        def forward(self, input):
            return super().forward(input)

    assert Declared(4, relu=True, pool=True).pool
    # a subclass is not asked for it unless it declares it itself (sync_bn does: alone, it
    # runs custom_bn's passes; synchronized, its forward pools after the normalization)
    assert NormSpec("custom_bn").fuses_pool and NormSpec("sync_bn").fuses_pool
    assert SyncBatchNorm(4, relu=True, pool=True).pool
    assert not NormSpec("ghost_bn").fuses_pool and not NormSpec("torch_bn").fuses_pool


def test_small_cnn_keeps_its_state_dict_keys_and_trains_as_with_torch_layers():
    """custom_bn's small_cnn (norms with the pooling fused) loads torch_bn's checkpoint,
    and a few float64 steps of both give the same losses and parameters."""
    torch.manual_seed(0)
    fused = build_model("small_cnn", NormSpec("custom_bn"), 1, 10, (28, 28)).double()
    plain = build_model("small_cnn", NormSpec("torch_bn"), 1, 10, (28, 28)).double()
    assert fused[1].pool and isinstance(fused[3], nn.Identity)
    assert isinstance(plain[3], nn.MaxPool2d)
    plain.load_state_dict(fused.state_dict())
    fused, plain = (m.to(memory_format=LAST) for m in (fused, plain))
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64).contiguous(memory_format=LAST)
    y = torch.randint(0, 10, (16,))
    losses = {}
    for name, model in (("fused", fused), ("plain", plain)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses[name] = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert losses["fused"] == pytest.approx(losses["plain"], rel=0, abs=1e-10)
    pairs = zip(fused.state_dict().items(), plain.state_dict().items(), strict=True)
    for (key, a), (_, b) in pairs:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=key)


def test_diagnostics_measure_the_norms_output_not_the_pooled_one():
    """bn_stats's train/eval gap of a layer with the pooling fused is that of the same
    layer without it: the norm's (and ReLU's) output, as for every other variant."""
    torch.manual_seed(0)
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3), BatchNorm2d(4, relu=True, pool=True))
    unpooled = copy.deepcopy(pooled)
    unpooled[1].pool = False
    shifted = torch.randn(8, 1, 10, 10) * 3
    for model in (pooled, unpooled):  # running statistics away from the batches'
        model.train()(shifted)
    batches = [torch.randn(8, 1, 10, 10).contiguous(memory_format=LAST) for _ in range(2)]
    got = measure(pooled.to(memory_format=LAST), batches)
    want = measure(unpooled.to(memory_format=LAST), batches)
    assert got[0]["train_eval_gap"] == pytest.approx(want[0]["train_eval_gap"], rel=1e-6)
    assert got[0]["train_eval_gap"] > 0.01
    assert pooled[1].pool  # the run's model is untouched


def test_training_without_tracking_leaves_the_running_statistics_alone():
    """track_running_stats=False set after construction: batch statistics, the buffers
    neither read nor written in training (torch's rule), read in eval."""
    torch.manual_seed(0)
    fused, plain = pair(torch.float64)
    for layer in (fused, plain[0]):
        layer.track_running_stats = False
    xs = [torch.randn(4, 8, 6, 6, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    for got, want in zip(steps(fused, xs, LAST), steps(plain, xs, LAST), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert torch.equal(fused.running_mean, torch.zeros(8, dtype=torch.float64))


def test_a_refused_step_writes_no_running_statistic_and_is_counted_as_torchs():
    """Arguments the forward refuses are refused before the running statistics are written,
    with torch's exception type; the batch is counted all the same, as torch counts it."""
    fused, plain = pair(torch.float32)
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=LAST)
    for layer in (fused, plain[0]):
        layer.weight = nn.Parameter(torch.ones(5))  # 5 values for 8 channels
    with pytest.raises(RuntimeError) as theirs:
        plain(x)
    with pytest.raises(type(theirs.value)):
        fused(x)
    assert torch.equal(fused.running_mean, torch.zeros(8))
    assert int(fused.num_batches_tracked) == int(plain[0].num_batches_tracked) == 1


def test_eval_refuses_running_statistics_torch_refuses():
    fused, plain = pair(torch.float32)
    fused.eval(), plain.eval()
    for layer in (fused, plain[0]):
        layer.running_var = layer.running_var.double()  # float64 beside float32 input
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=LAST)
    with pytest.raises(RuntimeError) as theirs:
        plain(x)
    with pytest.raises(type(theirs.value)):
        fused(x)


def test_a_double_backward_raises_rather_than_dropping_terms():
    fused, _ = pair(torch.float64)
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64).contiguous(memory_format=LAST)
    x.requires_grad_()
    (dx,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward"):
        dx.sum().backward()


def test_pooling_takes_4d_input_only():
    layer = BatchNorm2d(5, relu=True, pool=True)
    layer._check_input_dim = lambda input: None  # (BatchNorm2d's own check refuses it first)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        layer(torch.randn(4, 5, 8))


def test_a_forged_choice_byte_counts_as_a_dead_window_in_every_sum():
    """A choice byte the forward never writes (4 to 254) reads nothing out of place and
    contributes to neither dx nor the parameters' gradients."""
    lib = ops()
    x, weight, bias = inputs((2, 16, 4, 4), torch.float32)
    mean, invstd = lib.batch_norm_stats(x, 1e-5)
    _, choice = lib.relu_pool_forward(x, weight, bias, mean, invstd)
    forged = torch.full_like(choice, 7)
    dy = torch.randn(2, 16, 2, 2).contiguous(memory_format=LAST)
    dead = torch.full_like(choice, 255)
    got = lib.relu_pool_backward(dy, x, forged, weight, bias, mean, invstd)
    want = lib.relu_pool_backward(dy, x, dead, weight, bias, mean, invstd)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_opcheck_the_pooled_operators():
    """torch.library.opcheck (schema, fake, autograd registration, aot dispatch): the fakes
    give the operators' shapes and refuse what they refuse."""
    lib = ops()
    x, weight, bias = inputs((3, 4, 5, 6), torch.float32)
    mean, invstd = lib.batch_norm_stats(x, 1e-5)
    out, choice = lib.relu_pool_forward(x, weight, bias, mean, invstd)
    dy = torch.randn_like(out)
    for op, args in [
        (lib.relu_pool_forward, (x, weight, bias, mean, invstd)),
        (lib.relu_pool_forward, (x, None, None, mean, invstd)),
        (lib.relu_pool_backward, (dy, x, choice, weight, bias, mean, invstd)),
        (lib.relu_pool_backward, (dy, x, choice, None, None, mean, invstd, False)),
    ]:
        torch.library.opcheck(op, args)
    meta = x.to("meta")
    with pytest.raises(RuntimeError, match="channels_last"):
        lib.relu_pool_forward(meta.contiguous(), None, None, mean.to("meta"), invstd.to("meta"))


def test_parameters_of_shape_1_c_get_gradients_of_their_shape():
    """torch's forward takes a (1, C) weight and bias (as the fuzz cases give them): their
    gradients come back in that shape (torch's layer, given (C,) ones, is the reference)."""
    torch.manual_seed(0)
    fused, plain = pair(torch.float64)
    weight = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)
    bias = torch.linspace(-0.5, 0.5, 8, dtype=torch.float64)
    fused.weight, fused.bias = nn.Parameter(weight[None]), nn.Parameter(bias[None])
    plain[0].weight, plain[0].bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
    xs = [torch.randn(4, 8, 6, 6, dtype=torch.float64)]
    got, want = steps(fused, xs, LAST), steps(plain, xs, LAST)
    assert got[2].shape == (1, 8) and got[3].shape == (1, 8)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.reshape(w.shape), w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("where", [(0, 0, 1, 0), (0, 0, 0, 4), (0, 0, 4, 1), (0, 1, 0, 0)])
def test_an_infinite_value_the_pooling_drops_makes_the_weights_gradient_nan_as_torchs(where):
    """dweight sums dz * xhat over every value, dz 0 where the pooling or the ReLU passed
    nothing: 0 * inf is NaN there, as in torch's composition (eval mode: the statistics are
    the running ones, finite). Places: a value a window did not take, the odd last column,
    the odd last row, a dead window's."""
    lib = ops()
    x = torch.full((1, 2, 5, 5), -1.0, dtype=torch.float64)
    x[0, 0, :4, :4] = torch.arange(16.0, dtype=torch.float64).view(4, 4) + 1
    x[where] = float("-inf")  # never a window's largest: no window takes it
    x = x.contiguous(memory_format=LAST)
    one, zero = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    out, choice = lib.relu_pool_forward(x, one, zero, zero, one)
    dy = torch.ones_like(out)
    got = lib.relu_pool_backward(dy, x, choice, one, zero, zero, one, False)
    want = composed(x, one, zero, zero, one, dy, batch_stats=False)[1:]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=0, atol=0)
