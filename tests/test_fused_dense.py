"""lungxray.models.kernels.fused_dense: the seed network's large dense layer trained from an optimizer-kept bf16
copy gives what autocast + PyTorch's fused AdamW give, keeps AdamW's state format, and stays out of the way
everywhere else."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lungxray.config import TrainConfig
from lungxray.models.kernels import fused_stem as fs
from lungxray.models.kernels.fused_dense import MIN_WEIGHTS, attach_dense_masters
from lungxray.models.nets import PackedLinear, build_model
from lungxray.training.loop import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")
IN, OUT = 65536, 16  # 1 M weights: the smallest layer that gets a master


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    if not fs.fused_available():
        pytest.skip(f"fused kernels unavailable: {fs.kernel_info()['reason']}")


def pair(lr: float = 1e-3, wd: float = 0.05) -> tuple[PackedLinear, torch.optim.AdamW, PackedLinear, torch.optim.AdamW]:
    """(layer with a master, its AdamW, the same layer plain, its AdamW)."""
    torch.manual_seed(0)
    a = PackedLinear(IN, OUT)
    b = copy.deepcopy(a)
    oa = torch.optim.AdamW(a.parameters(), lr=lr, weight_decay=wd, fused=True)
    ob = torch.optim.AdamW(b.parameters(), lr=lr, weight_decay=wd, fused=True)
    assert attach_dense_masters(a, oa) == 1
    return a, oa, b, ob


def train_step(layer: PackedLinear, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    loss = ((y.float() - target) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return y.detach()


def test_one_step_equals_autocast_and_fused_adamw() -> None:
    a, oa, b, ob = pair()
    x, t = torch.randn(32, 1, IN), torch.randn(32, 1, OUT)
    ya, yb = train_step(a, oa, x, t), train_step(b, ob, x, t)
    assert ya.dtype == torch.bfloat16 and torch.equal(ya, yb)  # the same bf16 forward
    assert a.weight.grad is None and b.weight.grad is not None  # autograd never saw the weight gradient
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-8)
    torch.testing.assert_close(a.bias, b.bias, rtol=0, atol=1e-8)  # the bias takes the ordinary path
    sa, sb = oa.state[a.weight], ob.state[b.weight]
    assert sa.keys() == sb.keys() and float(sa["step"]) == float(sb["step"]) == 1.0
    torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-6, atol=0)
    torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-5, atol=0)
    assert torch.equal(a.master.w16, a.weight.view(OUT, IN).to(torch.bfloat16))  # written in the same pass


def test_several_steps_with_a_learning_rate_change_stay_together() -> None:
    a, oa, b, ob = pair()
    for step in range(4):
        x, t = torch.randn(32, 1, IN), torch.randn(32, 1, OUT)
        train_step(a, oa, x, t), train_step(b, ob, x, t)
        if step == 1:
            for g in oa.param_groups + ob.param_groups:
                g["lr"] = 2e-4
    # a bf16 rounding flip moves a few weights by a fraction of the learning rate; the rest agree to the last bits
    diff = (a.weight - b.weight).detach().abs()
    assert float(diff.max()) < 1e-4
    assert float(diff.median()) < 1e-8


def test_resumed_optimizer_state_continues_the_same_run() -> None:
    a, oa, _, _ = pair()
    x, t = torch.randn(32, 1, IN), torch.randn(32, 1, OUT)
    train_step(a, oa, x, t)
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(oa.state_dict())
    train_step(a, oa, x, t)

    c = PackedLinear(IN, OUT)  # a fresh process: new layer, new optimizer, state loaded from the "checkpoint"
    oc = torch.optim.AdamW(c.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    assert attach_dense_masters(c, oc) == 1
    c.load_state_dict(saved_model)
    oc.load_state_dict(saved_opt)
    train_step(c, oc, x, t)
    assert torch.equal(c.weight, a.weight) and float(oc.state[c.weight]["step"]) == 2.0


def test_weights_loaded_from_outside_are_cast_again() -> None:
    a, oa, _, _ = pair()
    x, t = torch.randn(8, 1, IN), torch.randn(8, 1, OUT)
    train_step(a, oa, x, t)
    new = PackedLinear(IN, OUT).state_dict()
    a.load_state_dict(new)  # e.g. early stopping restoring the best weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(x)
        expected = F.linear(x, new["weight"].view(OUT, IN), new["bias"])
    assert torch.equal(y, expected)


def test_a_second_gradient_on_the_weight_is_refused() -> None:
    a, oa, _, _ = pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(torch.randn(4, 1, IN))
    (y.float().sum() + a.weight.pow(2).sum()).backward()  # the penalty reaches the weight through autograd
    with pytest.raises(RuntimeError, match="also received an autograd gradient"):
        oa.step()


def test_kernels_switched_off_after_the_optimizer_never_drop_an_update(monkeypatch: pytest.MonkeyPatch) -> None:
    a, oa, _, _ = pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a(torch.randn(4, 1, IN)).float().sum().backward()
    monkeypatch.setenv(fs.ENV_SWITCH, "0")
    with pytest.raises(RuntimeError, match="unavailable now"):
        oa.step()


def test_plain_path_outside_bf16_training() -> None:
    a, _, _, _ = pair()
    assert copy.deepcopy(a).master is None  # no optimizer drives a copy's buffer
    x = torch.randn(4, 1, IN)
    a.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a(x).float().sum().backward()
    assert a.weight.grad is not None  # evaluation mode: ordinary F.linear
    a.train()
    a.weight.grad = None
    a(x).sum().backward()  # no autocast: fp32 F.linear
    assert a.weight.grad is not None and not a.master.pending


def test_attached_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    def attached(layer: torch.nn.Module, opt: type[torch.optim.Optimizer] = torch.optim.AdamW) -> int:
        return attach_dense_masters(layer, opt(layer.parameters(), lr=1e-3))

    assert attached(PackedLinear(IN, OUT)) == 1
    assert attached(PackedLinear(IN, OUT), torch.optim.SGD) == 0
    assert attached(PackedLinear(IN, OUT), torch.optim.Adam) == 0  # coupled L2, not AdamW's decoupled decay
    assert attached(PackedLinear(IN // 2, OUT, members=2)) == 0  # packed members use batched GEMMs
    assert attached(PackedLinear(MIN_WEIGHTS // OUT - 1, OUT)) == 0  # too small to matter
    monkeypatch.setenv(fs.ENV_SWITCH, "0")
    assert attached(PackedLinear(IN, OUT)) == 0


def test_seed_cnn_gets_one_master_and_trains() -> None:
    torch.manual_seed(0)
    model = build_model("seed_cnn", image_size=96).train()  # fc1: 128 x 12800 = 1.6 M weights
    opt = make_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3))
    assert model.fc1.master is not None and model.fc2.master is None
    off = build_model("seed_cnn", image_size=96)
    off.fused_dense = False
    make_optimizer(off, TrainConfig(optimizer="adamw"))
    assert off.fc1.master is None
    coupled = build_model("seed_cnn", image_size=96)
    make_optimizer(coupled, TrainConfig(optimizer="adamw", l2=1e-4))  # an L2 penalty gives fc1 its own gradient
    assert coupled.fc1.master is None
    x, y = torch.randn(8, 1, 96, 96).contiguous(memory_format=torch.channels_last), torch.arange(8) % 3
    before = model.fc1.weight.detach().clone()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float().reshape(8, 3), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and model.fc1.weight.grad is None
    assert not torch.equal(model.fc1.weight, before)


def _fit_seed_cnn(run_dir: Path, epochs: int, resume: bool) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """A real fit() of seed_cnn with its master, bf16 autocast, checkpointing every epoch (as a new process)."""
    from lungxray.runtime import seed_everything
    from lungxray.training.loop import fit
    from lungxray.training.plan import plan_members
    from lungxray.transforms.geometric import Augmenter, resolve_params

    seed_everything(0, deterministic=True)
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 3
    images = rng.integers(0, 255, (24, 96, 96)).astype(np.uint8)
    plan = plan_members(labels, members=1, bootstrap=True, seed=0)
    model = build_model("seed_cnn", image_size=96).to(memory_format=torch.channels_last)
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=1e-3, early_stopping_patience=0, precision="bf16")
    state = fit(model, torch.as_tensor(images), torch.as_tensor(labels), plan, cfg,
                Augmenter(resolve_params("seed"), seed=1), amp_dtype=torch.bfloat16, run_dir=run_dir, resume=resume)
    assert model.fc1.master is not None
    history = [{k: v for k, v in h.items() if k not in ("seconds", "images_per_second")} for h in state.history]
    return {k: v.clone() for k, v in model.state_dict().items()}, history


def test_fit_with_the_master_resumes_to_the_same_weights(tmp_path: Path) -> None:
    full_weights, full_history = _fit_seed_cnn(tmp_path / "full", epochs=3, resume=False)
    _fit_seed_cnn(tmp_path / "cut", epochs=1, resume=False)  # the checkpoint a killed run leaves behind
    weights, history = _fit_seed_cnn(tmp_path / "cut", epochs=3, resume=True)
    assert history == full_history
    for name, value in full_weights.items():
        assert torch.equal(weights[name], value), name
