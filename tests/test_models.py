"""lungxray.models.nets: the packed-ensemble contract, member portability, the registry, FLOPs and the fast paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lungxray.models import nets as models
from lungxray.models.nets import (
    build_model,
    count_flops,
    extract_member,
    list_models,
    model_info,
    register_model,
    stack_members,
)

SIZE = 64  # smallest size every model must accept; keeps the suite fast
MODELS = list_models()


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, members: int = 1, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, members=members, image_size=SIZE, **kwargs)


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN affine and running stats, so eval-mode BN would expose any member mix-up."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_shapes_and_finite(name: str, members: int) -> None:
    model = make(name, members).train()
    x = torch.randn(2, members, SIZE, SIZE)
    out = model(x)
    assert out.shape == (2, members, 3)
    assert out.isfinite().all()
    F.cross_entropy(out.reshape(-1, 3), torch.tensor([0, 1, 2] * members)[: 2 * members]).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), pname


@pytest.mark.parametrize("name", [n for n in MODELS if not n.startswith("seed")])
def test_global_pool_models_accept_any_size(name: str) -> None:
    model = make(name, 2).eval()
    for h, w in [(64, 64), (96, 80), (256, 256)]:
        assert model(torch.randn(1, 2, h, w)).shape == (1, 2, 3)


@pytest.mark.parametrize("name", MODELS)
def test_members_equal_plain_models(name: str) -> None:
    k_members = 3
    packed = make(name, k_members).eval()
    randomise_bn(packed)
    x = torch.randn(2, k_members, SIZE, SIZE)
    with torch.no_grad():
        out = packed(x)
        for k in range(k_members):
            plain = make(name, 1, seed=99).eval()
            plain.load_state_dict(extract_member(packed.state_dict(), k, k_members))
            torch.testing.assert_close(plain(x[:, k : k + 1]), out[:, k : k + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_members_do_not_share_gradients(name: str) -> None:
    packed = make(name, 3, dropout=0.0).train()
    packed(torch.randn(2, 3, SIZE, SIZE))[:, 1].sum().backward()
    grads = {n: p.grad for n, p in packed.named_parameters()}
    for pname, g in grads.items():
        parts = g.chunk(3)
        assert parts[0].abs().max() == 0 and parts[2].abs().max() == 0, pname
    assert any(g.chunk(3)[1].abs().max() > 0 for g in grads.values())


@pytest.mark.parametrize("name", [n for n in MODELS if has_bn(make(n))])
def test_train_mode_bn_stats_are_per_member(name: str) -> None:
    k_members = 3
    packed = make(name, k_members).train()
    before = {k: v.clone() for k, v in packed.state_dict().items()}
    x = torch.randn(4, k_members, SIZE, SIZE)
    x2 = x.clone()
    x2[:, 1] += torch.randn_like(x2[:, 1])  # only member 1 sees different images
    twin = make(name, k_members).train()
    with torch.no_grad():
        packed.features(x)
        twin.features(x2)
    after, twin_after = packed.state_dict(), twin.state_dict()
    for k in range(k_members):
        a, b = extract_member(after, k, k_members), extract_member(twin_after, k, k_members)
        same = [torch.equal(a[key], b[key]) for key in a if "running_" in key]
        assert all(same) if k != 1 else not any(same)
        # and each member's statistics are exactly what a plain model computes on that member's images
        plain = make(name, 1).train()
        plain.load_state_dict(extract_member(before, k, k_members))
        with torch.no_grad():
            plain.features(x[:, k : k + 1])
        for key, v in plain.state_dict().items():
            torch.testing.assert_close(v, a[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_extract_stack_round_trip(name: str) -> None:
    state = make(name, 3).state_dict()
    parts = [extract_member(state, k, 3) for k in range(3)]
    stacked = stack_members(parts)
    assert list(stacked) == list(state)
    assert all(torch.equal(stacked[key], state[key]) for key in state)
    make(name, 1).load_state_dict(parts[2])  # strict load into the plain architecture
    with pytest.raises(ValueError, match="out of range"):
        extract_member(state, 3, 3)


def test_stack_members_refuses_mismatched_dicts() -> None:
    a, b = make("compact_cnn").state_dict(), make("compact_cnn", width=8).state_dict()
    with pytest.raises(ValueError, match="does not match"):
        stack_members([a, b])


@pytest.mark.parametrize("name", MODELS)
def test_features_head_consistency(name: str) -> None:
    model = make(name, 2).eval()
    x = torch.randn(2, 2, SIZE, SIZE)
    with torch.no_grad():
        f = model.features(x)
        assert f.dim() == 4 and f.shape[:2] == (2, 2 * model.feature_channels)
        assert torch.equal(model.head(f), model(x))
    assert (model.members, model.num_classes, model.in_channels) == (2, 3, 1)


@pytest.mark.parametrize("name", MODELS)
def test_channels_last_bf16_autocast(name: str) -> None:
    model = make(name, 2).eval()
    x = torch.randn(2, 2, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x_cl).float()
    assert out.shape == ref.shape and out.isfinite().all()
    assert (out - ref).abs().max() <= 0.05 * (1 + ref.abs().max())
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x_cl).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_pool_before_relu_is_exact() -> None:
    """The speed trick: max-pool then ReLU equals ReLU then max-pool, values and gradients."""
    for args in [(2,), (3, 2, 1)]:
        x1 = torch.randn(2, 8, 33, 33, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_()
        a, b = F.max_pool2d(F.relu(x1), *args), F.relu(F.max_pool2d(x2, *args))
        assert torch.equal(a, b)
        a.sum().backward()
        b.sum().backward()
        assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("name", ["seed_cnn", "seed_cnn_bn"])
def test_seed_features_match_conventional_order(name: str) -> None:
    model = make(name).eval()
    randomise_bn(model)
    x = torch.randn(2, 1, SIZE, SIZE)
    ref = x
    with torch.no_grad():
        for blk in model.blocks:  # the seed's order: conv -> [BN] -> ReLU -> pool
            ref = blk.pool(F.relu(blk.bn(blk.conv(ref))))
        assert torch.equal(model.features(x), ref)


def test_seed_cnn_size_and_flops() -> None:
    """The seed's Keras model at 256x256: 14.84 M parameters, 1.17 GFLOPs (2 x MACs) per image."""
    model = build_model("seed_cnn")
    assert abs(sum(p.numel() for p in model.parameters()) / 14.8e6 - 1) < 0.02
    assert abs(count_flops(model, 256) / 1.17e9 - 1) < 0.02
    assert model.training  # count_flops restores the mode
    bn = build_model("seed_cnn_bn")
    assert has_bn(bn) and all(m.bias is None for m in bn.modules() if isinstance(m, nn.Conv2d))
    assert not has_bn(model)


@pytest.mark.parametrize(("name", "limit"), [("compact_cnn", 0.3e9), ("resnet_small", 0.6e9)])
def test_fast_models_flops_per_member(name: str, limit: float) -> None:
    one, three = build_model(name), build_model(name, members=3)
    assert count_flops(one) == count_flops(three) < limit
    n_one, n_three = (sum(p.numel() for p in m.parameters()) for m in (one, three))
    assert n_three == 3 * n_one


def test_init_per_member_matches_plain_distribution() -> None:
    torch.manual_seed(0)
    plain, packed = build_model("compact_cnn"), build_model("compact_cnn", members=4)
    expected = (2 / (128 * 9)) ** 0.5  # kaiming fan_out of a plain 128->128 3x3 conv
    for w in [plain.body[-1].conv.weight, *packed.body[-1].conv.weight.chunk(4)]:
        assert abs(w.std().item() / expected - 1) < 0.05
    bound = 1 / 128**0.5  # nn.Linear's default per member
    assert abs(packed.fc.weight.abs().max().item() / bound - 1) < 0.05


def test_registry_errors_and_info(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # keep the real registry untouched
    with pytest.raises(ValueError, match="already registered"):
        register_model("seed_cnn")(models.SeedCNN)
    with pytest.raises(TypeError, match="nonsense"):
        register_model("tmp_bad", nonsense=1)(models.SeedCNN)
    register_model("tmp_wide", "wider compact net", width=32)(models.CompactCNN)
    assert "tmp_wide" in list_models() and model_info("tmp_wide")["default_args"]["width"] == 32
    with pytest.raises(ValueError, match="seed_cnn"):
        build_model("no_such_model")
    with pytest.raises(TypeError, match="bogus"):
        build_model("seed_cnn", bogus=1)
    with pytest.raises(ValueError, match="members"):
        build_model("compact_cnn", members=0)
    info = model_info("seed_cnn_bn")
    assert info["description"] and info["default_args"]["batch_norm"] is True


def test_build_args_rebuild_and_input_checks() -> None:
    model = make("seed_cnn", 2, width=8)
    rebuilt = build_model(**model.build_args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="members"):
        model(torch.randn(1, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(1, 2, 2 * SIZE, 2 * SIZE))


def _seed_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batch: int) -> dict[str, torch.Tensor]:
    """One fp32 SGD step of a seed net (fixed dropout draw); returns the gradients, the weights are updated."""
    model.micro_batch = micro_batch
    model.train()
    torch.manual_seed(123)  # the same dropout mask for both runs
    logits = model(x)  # (B, K, C)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return grads


@pytest.mark.parametrize("members", [1, 2])
def test_seed_micro_batch_same_gradient_and_update(members: int) -> None:
    """Slicing the conv blocks into micro-batches must not change the training step (no BatchNorm: exact math).

    Batch 7 in slices of 3 (3 + 3 + 1) also covers an uneven last slice; a wrong concatenation order, a
    dropped slice or a per-slice mean would all change the gradient far beyond the tolerance.
    """
    torch.manual_seed(1)
    x, y = torch.randn(7, members, SIZE, SIZE), torch.randint(0, 3, (7, members))
    whole, sliced = make("seed_cnn", members, width=8), make("seed_cnn", members, width=8)
    calls: list[int] = []
    sliced.blocks[0].register_forward_hook(lambda _m, inp, _out: calls.append(inp[0].shape[0]))
    g_whole = _seed_step(whole, x, y, micro_batch=0)
    g_sliced = _seed_step(sliced, x, y, micro_batch=3)
    assert calls == [3, 3, 1]  # the slicing did happen
    for name, g in g_whole.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g_sliced[name], g, rtol=1e-4, atol=1e-6, msg=name)
    for (name, p), q in zip(whole.named_parameters(), sliced.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_seed_micro_batch_only_when_training_without_bn() -> None:
    """Evaluation (export, Grad-CAM) and BatchNorm models run the whole batch at once."""
    cases = [("seed_cnn", False, [5]), ("seed_cnn_bn", True, [5]), ("seed_cnn", True, [2, 2, 1])]
    for name, training, expected in cases:
        model = make(name, width=8).train(training)
        model.micro_batch = 2
        calls: list[int] = []
        model.blocks[0].register_forward_hook(lambda _m, inp, _out, calls=calls: calls.append(inp[0].shape[0]))
        model(torch.randn(5, 1, SIZE, SIZE))
        assert calls == expected, name
