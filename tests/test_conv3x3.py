"""The fp32 3x3 convolution kernels (`models.kernels.conv3x3`) compute what nn.Conv2d computes, values and gradients,
whichever pass runs where; the per-shape choice is measured, cached and overridable."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from pooling import gradients_where_pools_agree

from lungxray.models import nets
from lungxray.models.kernels import conv3x3 as c3
from lungxray.models.nets import build_model

pytestmark = pytest.mark.usefixtures("not_deterministic")  # another test may have left deterministic mode on


needs_kernel = pytest.mark.skipif(not c3.conv3x3_available(), reason="conv3x3 kernel needs gcc and AVX2+FMA")


def _reference(conv: torch.nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    w = conv.weight.detach().clone().requires_grad_()
    b = conv.bias.detach().clone().requires_grad_() if conv.bias is not None else None
    xx = x.detach().clone().requires_grad_()
    y = F.conv2d(xx, w, b, 1, conv.padding, 1, conv.groups)
    y.backward(g)
    return y.detach(), xx.grad, w.grad, b.grad if b is not None else None


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = b.abs().max().item() or 1.0
    assert (a - b).abs().max().item() <= 2e-5 * scale, (a - b).abs().max().item() / scale


@needs_kernel
@pytest.mark.parametrize("plan", [c3.Plan("direct", "direct", "direct"), c3.Plan("onednn", "onednn", "direct"),
                                  c3.Plan("direct", "onednn", "onednn"), c3.Plan("winograd", "winograd", "winograd"),
                                  c3.Plan("winograd4", "winograd4", "winograd4")])
@pytest.mark.parametrize(("cin", "cout", "groups", "pad", "size", "bias"),
                         [(32, 16, 1, 0, 11, True), (16, 32, 3, 1, 9, False), (6, 16, 2, 1, 7, True),
                          (16, 16, 1, 0, 3, True), (128, 16, 2, 1, 16, True)])
def test_every_pass_matches_conv2d(plan: c3.Plan, cin: int, cout: int, groups: int, pad: int, size: int,
                                   bias: bool) -> None:
    if plan.input_grad != "onednn" and cin % 16:
        plan = c3.Plan(plan.forward, "onednn", plan.weight_grad)  # the kernel's input gradient needs 16 | cin
    if plan.forward in c3.WINOGRAD_TILE and cin % 8:
        plan = c3.Plan("direct", plan.input_grad, "direct")  # Winograd's forward and weight gradient need 8 | cin
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin * groups, cout * groups, 3, padding=pad, groups=groups, bias=bias)
    x = torch.randn(3, cin * groups, size, size + 2).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = c3._Conv3x3.apply(x, conv.weight, conv.bias, pad, groups, plan)
    g = torch.randn_like(out)
    out.backward(g)
    ref_y, ref_dx, ref_dw, ref_db = _reference(conv, x, g)
    _close(out.detach(), ref_y)
    _close(x.grad, ref_dx)
    _close(conv.weight.grad, ref_dw)
    if bias:
        _close(conv.bias.grad, ref_db)


@needs_kernel
def test_nchw_input_and_no_input_gradient() -> None:
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(16, 32, 3)
    x = torch.randn(2, 16, 8, 8)  # contiguous NCHW, no gradient wanted (a first layer)
    out = c3._Conv3x3.apply(x, conv.weight, conv.bias, 0, 1, c3.Plan("direct", "direct", "direct"))
    out.sum().backward()
    w = conv.weight.detach().clone().requires_grad_()
    F.conv2d(x, w, conv.bias.detach()).sum().backward()
    _close(conv.weight.grad, w.grad)


def test_used_only_where_it_computes_the_same_function() -> None:
    conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 8, 8)
    conv.eval()
    assert not c3.use_conv3x3(conv, x)  # evaluation, export and Grad-CAM run the module
    conv.train()
    assert not c3.use_conv3x3(conv, x.double())
    assert not c3.use_conv3x3(torch.nn.Conv2d(16, 32, 3, stride=2), x)
    assert not c3.use_conv3x3(torch.nn.Conv2d(16, 24, 3), x)  # 24 output channels: not a multiple of 16
    assert not c3.use_conv3x3(torch.nn.Conv2d(16, 32, 3, padding=1, padding_mode="reflect"), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not c3.use_conv3x3(conv, x)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert not c3.use_conv3x3(conv, x)  # deterministic runs keep oneDNN: a measured choice could differ
    finally:
        torch.use_deterministic_algorithms(False)
    handle = conv.register_forward_hook(lambda *a: None)
    assert not c3.use_conv3x3(conv, x)
    handle.remove()
    assert c3.use_conv3x3(conv, x) == c3.conv3x3_available()


@needs_kernel
def test_the_choice_is_measured_once_cached_and_forced_by_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LUNGXRAY_CACHE", str(tmp_path))
    monkeypatch.setattr(c3, "_plans", {})
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).train()
    x = torch.randn(2, 16, 12, 12)
    plan = c3.plan_for(conv, x)
    assert {plan.forward, plan.input_grad, plan.weight_grad} <= {"direct", "winograd", "winograd4", "onednn"}
    assert set(plan.times_ms) >= {"forward/direct", "forward/winograd", "forward/winograd4", "forward/onednn",
                                  "input_grad/winograd", "input_grad/winograd4", "weight_grad/direct",
                                  "weight_grad/winograd", "weight_grad/winograd4", "weight_grad/onednn"}
    stored = json.loads((tmp_path / "autotune" / "conv3x3" / "plans.json").read_text())
    assert [v["forward"] for v in stored.values()] == [plan.forward]
    c3._plans.clear()
    assert c3.plan_for(conv, x) == plan  # read back from the file, not measured again
    monkeypatch.setenv(c3.CHOICE_ENV, "direct")
    assert c3.plan_for(conv, x) == c3.Plan("direct", "direct", "direct")
    monkeypatch.setenv(c3.CHOICE_ENV, "winograd")
    assert c3.plan_for(conv, x) == c3.Plan("winograd", "winograd", "winograd")
    monkeypatch.setenv(c3.CHOICE_ENV, "winograd4")
    assert c3.plan_for(conv, x) == c3.Plan("winograd4", "winograd4", "winograd4")
    monkeypatch.setenv(c3.CHOICE_ENV, "onednn")
    assert not c3.use_conv3x3(conv, x)


@needs_kernel
@pytest.mark.parametrize("kernel", ["direct", "winograd", "winograd4"])
@pytest.mark.parametrize("arch", ["seed_cnn", "compact_cnn"])
def test_a_training_step_gives_the_same_gradients_with_the_kernels(arch: str, kernel: str, monkeypatch) -> None:
    torch.manual_seed(2)
    model = build_model(arch, members=2, image_size=64, dropout=0.0).train()
    calls = []
    monkeypatch.setattr(nets, "conv3x3", lambda conv, t: calls.append(conv) or c3.conv3x3(conv, t))
    ours, theirs = gradients_where_pools_agree(
        model, [lambda: monkeypatch.setenv(c3.CHOICE_ENV, kernel), lambda: monkeypatch.setenv(c3.CHOICE_ENV, "onednn")],
        (4, 2, 64, 64), monkeypatch)
    assert calls  # the kernels ran (LUNGXRAY_CONV3X3=onednn turns them off)
    for name, g in ours.items():
        _close(g, theirs[name])


@needs_kernel
def test_a_layer_the_kernels_cannot_take_every_pass_of_keeps_onednn_for_those(tmp_path, monkeypatch) -> None:
    """4 input channels: no Winograd (8 | Ci) and no kernel input gradient (16 | Ci); the rest is still measured."""
    monkeypatch.setenv("LUNGXRAY_CACHE", str(tmp_path))
    monkeypatch.setattr(c3, "_plans", {})
    plan = c3.plan_for(torch.nn.Conv2d(4, 16, 3).train(), torch.randn(2, 4, 10, 10))
    assert plan.input_grad == "onednn" and plan.forward in ("direct", "onednn")
    assert not {"forward/winograd", "forward/winograd4", "input_grad/direct"} & set(plan.times_ms)


@needs_kernel
def test_inference_borrows_the_plan_of_the_nearest_measured_batch(tmp_path, monkeypatch) -> None:
    """The validation's short last batch must not pay a measurement of passes it never runs backward."""
    monkeypatch.setenv("LUNGXRAY_CACHE", str(tmp_path))
    monkeypatch.setattr(c3, "_plans", {})
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).train()
    measured = c3.plan_for(conv, torch.randn(8, 32, 6, 6))
    monkeypatch.setattr(c3, "_measure", lambda *a: pytest.fail("measured again"))
    with torch.no_grad():
        near = c3.plan_for(conv, torch.randn(3, 32, 6, 6))  # bucket 4, borrowed from bucket 8
    assert _passes(near) == _passes(measured) and near.like == "ci32-co32-6x6-p1-g1-n8-t" + str(torch.get_num_threads())
    with pytest.raises(pytest.fail.Exception):  # training measures its own batch size
        c3.plan_for(conv, torch.randn(3, 32, 6, 6))
    with torch.no_grad(), pytest.raises(pytest.fail.Exception):  # another layer shape has nothing to borrow
        c3.plan_for(torch.nn.Conv2d(32, 32, 3).train(), torch.randn(3, 32, 6, 6))


def _passes(plan: c3.Plan) -> tuple[str, str, str]:
    return plan.forward, plan.input_grad, plan.weight_grad


@needs_kernel
def test_a_network_that_lost_members_trains_on_the_plan_of_the_nearest_group_count(tmp_path, monkeypatch) -> None:
    """Early-stopped members shrink the packed network's groups (16 -> 8 -> 4 buckets): measuring each new bucket
    cost the reference 6-23 s; the same layer measured at another group count lends its plan, kept for the process."""
    monkeypatch.setenv("LUNGXRAY_CACHE", str(tmp_path))
    monkeypatch.setattr(c3, "_plans", {})
    wide, narrow = (torch.nn.Conv2d(16 * g, 16 * g, 3, padding=1, groups=g).train() for g in (4, 2))
    measured = c3.plan_for(wide, torch.randn(4, 64, 6, 6))
    monkeypatch.setattr(c3, "_measure", lambda *a: pytest.fail("measured again"))
    lent = c3.plan_for(narrow, torch.randn(4, 32, 6, 6))
    assert _passes(lent) == _passes(measured) and lent.like.startswith("ci16-co16-6x6-p1-g4-n4-")
    assert c3.plan_for(narrow, torch.randn(4, 32, 6, 6)) is lent  # kept
    assert any(line.endswith(f"(as {lent.like})") for line in c3.chosen().values())
    assert "g2" not in json.dumps(c3._read_cache())  # not cached on disk: a run that starts at 2 groups measures
    with pytest.raises(pytest.fail.Exception):  # another batch bucket: training measures it
        c3.plan_for(narrow, torch.randn(16, 32, 6, 6))


@needs_kernel
def test_calibration_candidates_borrow_plans_across_threads(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LUNGXRAY_CACHE", str(tmp_path))
    monkeypatch.setattr(c3, "_plans", {})
    conv, x = torch.nn.Conv2d(16, 16, 3, padding=1).train(), torch.randn(4, 16, 6, 6)
    measured = c3.plan_for(conv, x)
    monkeypatch.setattr(c3, "_measure", lambda *a: pytest.fail("measured again"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        with c3.borrowing_plans():
            assert _passes(c3.plan_for(conv, x)) == _passes(measured)
        with pytest.raises(pytest.fail.Exception):  # outside calibration another thread count is measured
            c3.plan_for(conv, x)
    finally:
        torch.set_num_threads(threads)


def test_a_pass_far_behind_after_one_round_is_not_timed_again() -> None:
    import time

    calls = {"forward/fast": 0, "forward/slow": 0, "weight_grad/alone": 0}

    def timed(name: str, seconds: float):
        def fn() -> None:
            calls[name] += 1
            time.sleep(seconds)
        return fn

    ms = c3._best_ms({"forward/fast": timed("forward/fast", 0.002), "forward/slow": timed("forward/slow", 0.02),
                      "weight_grad/alone": timed("weight_grad/alone", 0.02)}, rounds=3)
    assert calls == {"forward/fast": 4, "forward/slow": 2, "weight_grad/alone": 4}  # untimed call + rounds raced
    assert ms["forward/slow"] > c3.OUT_OF_RACE * ms["forward/fast"]
