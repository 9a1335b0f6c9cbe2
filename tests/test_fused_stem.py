"""lungxray.models.kernels.fused_stem: the C kernels for seed_cnn's first block (conv -> max-pool -> ReLU) and for the
max-pool -> ReLU of blocks 2-3 equal the eager modules.

The kernel-specific tests skip (with the reason) where the kernel cannot be built; the fallback tests run
everywhere, also under LUNGXRAY_FUSED=0.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lungxray.models.kernels import fused_stem as fs
from lungxray.models.kernels import loader
from lungxray.models.nets import build_model

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kernel() -> None:
    if not fs.fused_available():
        pytest.skip(f"fused kernel unavailable: {fs.kernel_info()['reason']}")


def eager(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    return F.relu(F.max_pool2d(F.conv2d(x, w, b, groups=groups), 2))


def _pair(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    a = [t.detach().clone().requires_grad_() for t in tensors]
    b = [t.detach().clone().requires_grad_() for t in tensors]
    return a, b


def _run(fn: Callable[..., torch.Tensor], args: list[torch.Tensor], groups: int, g: torch.Tensor) -> torch.Tensor:
    out = fn(*args, groups)
    out.backward(g)
    return out


@pytest.mark.parametrize(("members", "cout", "h", "w"), [(1, 32, 17, 20), (2, 32, 33, 31), (2, 20, 9, 8),
                                                         (3, 5, 4, 4)])
def test_matches_eager_fp32(kernel: None, members: int, cout: int, h: int, w: int) -> None:
    """Values and gradients (weight, bias, input) of random fp32 data, any channel count and odd sizes."""
    torch.manual_seed(members * 100 + h)
    x = torch.randn(3, members, h, w)
    wt, b = torch.randn(members * cout, 1, 3, 3) * 0.4, torch.randn(members * cout) * 0.1
    (xa, wa, ba), (xb, wb, bb) = _pair(x, wt, b)
    g = torch.randn(3, members * cout, (h - 2) // 2, (w - 2) // 2)
    ref = _run(eager, [xa, wa, ba], members, g)
    out = _run(fs.fused_stem, [xb, wb, bb], members, g)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (ref == 0).any() and (ref > 0).any()  # both sides of the ReLU are exercised
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in ((wb.grad, wa.grad), (bb.grad, ba.grad), (xb.grad, xa.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_ties_and_relu_boundary_exact(kernel: None) -> None:
    """Integer data: the conv is exact, so ties in the 2x2 window (first maximum wins, as in PyTorch) and outputs
    of exactly 0 (no gradient through the ReLU) must give bit-identical values and gradients."""
    torch.manual_seed(0)
    x = torch.randint(0, 3, (2, 2, 14, 13)).float()
    x[:, :, :6, :6] = 1.0  # a flat patch: all four window values equal
    wt = torch.randint(-1, 2, (2 * 16, 1, 3, 3)).float()
    b = torch.randint(-2, 3, (2 * 16,)).float()
    g = torch.randint(-3, 4, (2, 32, 6, 5)).float()
    (xa, wa, ba), (xb, wb, bb) = _pair(x, wt, b)
    ref = _run(eager, [xa, wa, ba], 2, g)
    out = _run(fs.fused_stem, [xb, wb, bb], 2, g)
    assert (ref == 0).sum() > 10
    assert torch.equal(out, ref)
    for got, want in ((wb.grad, wa.grad), (bb.grad, ba.grad), (xb.grad, xa.grad)):
        assert torch.equal(got, want)


def test_bf16_autocast_channels_last(kernel: None) -> None:
    """Under bf16 autocast the output is bf16 and channels_last, like the eager block's; the kernel accumulates in
    fp32, so it is at least as close to the fp32 result as the eager bf16 block."""
    torch.manual_seed(1)
    x = torch.randn(4, 2, 30, 30).contiguous(memory_format=torch.channels_last)
    wt, b = torch.randn(64, 1, 3, 3) * 0.4, torch.randn(64) * 0.1
    (xa, wa, ba), (xb, wb, bb), (xc, wc, bc) = *_pair(x, wt, b), _pair(x, wt, b)[0]
    exact = eager(xc, wc, bc, 2)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = eager(xa, wa, ba, 2)
        out = fs.fused_stem(xb, wb, bb, 2)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    err_fused, err_eager = ((t.float() - exact).abs().max() for t in (out, ref))
    assert err_fused <= err_eager + 1e-6 and err_fused <= 2**-8 * exact.abs().max()  # one bf16 rounding
    g = torch.randn(out.shape).to(torch.bfloat16)
    for t in (ref, out, exact):
        t.backward(g.float() if t is exact else g)
    assert wb.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32
    # the eager bf16 block rounds the conv before the max, so ties and argmax positions move; the kernel's do not
    for got, bf16, want in ((wb.grad, wa.grad, wc.grad), (bb.grad, ba.grad, bc.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        assert (got - want).abs().max() <= (bf16 - want).abs().max()


def _seed_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(123)  # the same dropout mask for both runs
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("members", "micro_batch"), [(1, 0), (2, 3)])
def test_seed_cnn_training_step_same_with_and_without_kernel(kernel: None, monkeypatch: pytest.MonkeyPatch,
                                                             members: int, micro_batch: int) -> None:
    torch.manual_seed(2)
    x, y = torch.randn(5, members, SIZE, SIZE), torch.randint(0, 3, (5, members))
    torch.manual_seed(0)
    model = build_model("seed_cnn", members=members, image_size=SIZE, width=8).train()
    model.micro_batch = micro_batch
    calls: list[int] = []
    apply = fs._FusedStem.apply
    monkeypatch.setattr(fs._FusedStem, "apply", lambda *a: calls.append(a[0].shape[0]) or apply(*a))
    model.fused = True
    loss_on, g_on = _seed_step(model, x, y)
    assert calls == ([5] if micro_batch == 0 else [3, 2])  # the kernel ran, once per slice
    model.fused = False
    loss_off, g_off = _seed_step(model, x, y)
    assert len(calls) == (1 if micro_batch == 0 else 2)  # and not a second time
    assert abs(loss_on - loss_off) <= 1e-5 * abs(loss_off)
    for name, g in g_off.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g_on[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace
def test_kernel_only_where_the_graph_must_not_see_it(kernel: None) -> None:
    """Evaluation, BatchNorm models, hooks on the first block and tracing keep the plain modules."""
    x = torch.randn(2, 1, SIZE, SIZE)
    seen: list[str] = []

    def spy(_m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.append("block0")

    model = build_model("seed_cnn", image_size=SIZE, width=8)
    model.micro_batch = 0
    assert model.train()._fused_first_block(x)
    assert not model.eval()._fused_first_block(x)
    assert not build_model("seed_cnn_bn", image_size=SIZE, width=8).train()._fused_first_block(x)
    model.train()
    handle = model.blocks[0].register_forward_hook(spy)
    assert not model._fused_first_block(x)
    model(x)
    assert seen == ["block0"]
    handle.remove()
    conv = model.blocks[0].conv
    results: list[bool] = []

    class Probe(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            results.append(fs.use_fused_stem(conv, t))
            return t * 2

    torch.jit.trace(Probe(), x, check_trace=False)
    assert results == [False]
    assert fs.use_fused_stem(conv, x)
    assert not fs.use_fused_stem(conv, x.double())  # fp64 input: eager
    with torch.autocast("cpu", dtype=torch.float16):
        assert not fs.use_fused_stem(conv, x)


def test_cache_reuses_the_library(kernel: None) -> None:
    cc = shutil.which("gcc")
    assert cc is not None
    first, _ = loader.build(cc, fs.SOURCE)
    assert loader.build(cc, fs.SOURCE) == (first, None) and first.exists() and first.parent.name == "kernels"
    assert not list(first.parent.glob("*.tmp.so"))  # no temporary left behind


def test_fallback_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fs.ENV_SWITCH, "0")
    assert not fs.fused_available()
    model = build_model("seed_cnn", image_size=SIZE, width=8).train()
    x = torch.randn(3, 1, SIZE, SIZE)
    assert not model._fused_first_block(x) and not fs.use_fused_pool_relu(x)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_fallback_when_the_build_fails(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No usable compiler: one warning, then the eager path."""
    monkeypatch.delenv(fs.ENV_SWITCH, raising=False)
    monkeypatch.setattr(fs, "_state", {"lib": None, "tried": False, "reason": None, "compile_s": None, "path": None})
    monkeypatch.setenv("CC", "/nonexistent/gcc")
    model = build_model("seed_cnn", image_size=SIZE, width=8).train()
    x = torch.randn(2, 1, SIZE, SIZE)
    with caplog.at_level(logging.WARNING, logger="lungxray.models.kernels.fused_stem"):
        assert not fs.fused_available()
        assert not model._fused_first_block(x)
        model(x).sum().backward()
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert fs.kernel_info()["reason"]


# ----------------------------------------------------------------------- blocks 2-3: max-pool 2x2 -> ReLU
def eager_pool_relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(F.max_pool2d(x, 2), inplace=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize(("n", "c", "h", "w"), [(2, 64, 14, 12), (3, 20, 9, 11), (1, 128, 7, 6), (2, 5, 2, 3)])
def test_pool_relu_matches_eager_exactly(kernel: None, dtype: torch.dtype, channels_last: bool, n: int, c: int,
                                         h: int, w: int) -> None:
    """Small integers: ties in the window (first maximum wins), outputs of exactly 0 (no gradient), NaN (kept, and
    its gradient flows as through relu), odd sizes (last row/column never selected). Bit-identical values and
    gradients, in the input's dtype; the output is channels_last."""
    torch.manual_seed(n * 1000 + c + h)
    x = torch.randint(-3, 4, (n, c, h, w)).to(dtype)
    x[0, 0, 0, 0] = float("nan")
    x[-1, -1, :2, :2] = float("nan")
    x[0, 1, :2, :2] = float("-inf")  # all four equal: index 0, value -inf -> 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    (xa,), (xb,) = _pair(x)
    ref, out = eager_pool_relu(xa), fs.fused_pool_relu(xb)
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (ref == 0).any() and (ref > 0).any() and ref.isnan().sum() == 2
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    g = torch.randint(-3, 4, ref.shape).to(dtype)
    ref.backward(g)
    out.backward(g)
    assert xb.grad.dtype == dtype and torch.equal(xb.grad, xa.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_without_relu_matches_max_pool_exactly(kernel: None, dtype: torch.dtype) -> None:
    """relu=False (the pool before BatchNorm in pool_first blocks): max_pool2d's values and gradients bit for bit,
    negative maxima, ties, NaN and an odd last row and column included."""
    torch.manual_seed(7)
    x = torch.randint(-3, 4, (3, 16, 9, 7)).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 0] = float("nan")
    (xa,), (xb,) = _pair(x)
    ref, out = F.max_pool2d(xa, 2), fs.fused_pool_relu(xb, relu=False)
    assert (ref < 0).any()
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    g = torch.randint(-3, 4, ref.shape).to(dtype)
    ref.backward(g)
    out.backward(g)
    assert torch.equal(xb.grad, xa.grad)


def test_pool_first_blocks_use_the_pool_kernel_in_training(kernel: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """compact_cnn's conv -> pool -> BN blocks: the kernel runs in training (and not in evaluation), same loss."""
    torch.manual_seed(3)
    model = build_model("compact_cnn", members=2, image_size=64, dropout=0.0)
    x = torch.randn(4, 2, 64, 64)
    calls: list[bool] = []
    apply = fs._FusedPoolReLU.apply
    monkeypatch.setattr(fs._FusedPoolReLU, "apply", lambda t, relu: calls.append(relu) or apply(t, relu))
    model.eval()
    model(x)
    assert calls == []
    model.train()
    loss_on = model(x).square().mean()
    assert calls and not any(calls)
    monkeypatch.setenv(fs.ENV_SWITCH, "0")
    torch.testing.assert_close(model(x).square().mean(), loss_on, rtol=1e-6, atol=0)


def test_pool_relu_random_bf16_under_autocast(kernel: None) -> None:
    """Random bf16 data as the conv leaves it under autocast, gradient arriving in fp32 (autograd casts it back)."""
    torch.manual_seed(5)
    x = torch.randn(4, 32, 21, 20).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    (xa,), (xb,) = _pair(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = eager_pool_relu(xa), fs.fused_pool_relu(xb)
    assert torch.equal(out, ref)
    g = torch.randn(ref.shape)
    ref.float().backward(g)
    out.float().backward(g)
    assert torch.equal(xb.grad, xa.grad)


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize(("members", "micro_batch"), [(1, 0), (2, 3)])
def test_seed_cnn_step_identical_with_and_without_pool_kernel(kernel: None, monkeypatch: pytest.MonkeyPatch, amp: bool,
                                                              members: int, micro_batch: int) -> None:
    """The pool kernel changes no bit of a training step (fp32 and bf16 autocast): loss and every gradient equal."""
    torch.manual_seed(2)
    x = torch.randn(5, members, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (5, members))
    torch.manual_seed(0)
    model = build_model("seed_cnn", members=members, image_size=SIZE, width=8).train()
    model = model.to(memory_format=torch.channels_last)
    model.micro_batch = micro_batch
    calls: list[int] = []
    apply = fs._FusedPoolReLU.apply
    monkeypatch.setattr(fs._FusedPoolReLU, "apply", lambda *a: calls.append(a[0].shape[0]) or apply(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        model.fused_pool = True
        loss_on, g_on = _seed_step(model, x, y)
        assert calls == ([5, 5] if micro_batch == 0 else [3, 3, 2, 2])  # blocks 2 and 3 of every slice
        model.fused_pool = False
        loss_off, g_off = _seed_step(model, x, y)
    assert len(calls) == (2 if micro_batch == 0 else 4)
    assert loss_on == loss_off
    for name, g in g_off.items():
        assert g.abs().max() > 0, name
        assert torch.equal(g_on[name], g), name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace
def test_pool_kernel_only_where_the_graph_must_not_see_it(kernel: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation, BatchNorm, hooks on a block (or on the blocks), fp16 and tracing keep the plain modules."""
    calls: list[int] = []
    apply = fs._FusedPoolReLU.apply
    monkeypatch.setattr(fs._FusedPoolReLU, "apply", lambda *a: calls.append(1) or apply(*a))
    x = torch.randn(2, 1, SIZE, SIZE)
    model = build_model("seed_cnn", image_size=SIZE, width=8)
    model.micro_batch = 0
    model.eval()(x)
    build_model("seed_cnn_bn", image_size=SIZE, width=8).train()(x)
    assert calls == []
    model.train()(x)
    assert len(calls) == 2
    handle = model.blocks[2].register_forward_hook(lambda *_: None)
    model(x)
    assert len(calls) == 3  # block 2 still fused, block 3 as written
    handle.remove()
    handle = model.blocks.register_forward_pre_hook(lambda *_: None)
    model(x)
    assert len(calls) == 3
    handle.remove()
    assert fs.use_fused_pool_relu(x) and fs.use_fused_pool_relu(x.bfloat16())
    assert not fs.use_fused_pool_relu(x.half()) and not fs.use_fused_pool_relu(x[..., :1])
    results: list[bool] = []

    class Probe(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            results.append(fs.use_fused_pool_relu(t))
            return t * 2

    torch.jit.trace(Probe(), x, check_trace=False)
    assert results == [False]


def test_the_ctypes_table_matches_the_c_prototypes() -> None:
    """fs.SIGNATURES is the Python side of every exported kernel; the C file's prototypes must say the same."""
    import re

    c_types = {"int64_t": "i64", "int": "i"}
    source = fs.SOURCE.read_text()
    found = {}
    for name, params in re.findall(r"^int (seed_\w+)\(([^)]*)\)", source, flags=re.M):
        kinds = []
        for param in (p.strip() for p in params.replace("\n", " ").split(",")):
            kinds.append("p" if "*" in param else c_types[param.split()[0]])
        found[name] = tuple(kinds)
    assert found == fs.SIGNATURES
