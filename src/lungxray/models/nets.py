"""Model registry and from-scratch CNNs, every one a packed ensemble of K members (K=1 is a plain model).

Packed-Ensembles (Laurent et al., ICLR 2023) with alpha=gamma=1: grouped convolutions, BatchNorm over K*C
channels and a batched linear layer run K independent copies of the plain network in one pass, so K bootstrap
members cost one training loop. Input (B, K*in_channels, H, W) holds member k's images in channels
[k*in_channels:(k+1)*in_channels]; output logits are (B, K, num_classes), also for K=1.

Invariant that keeps members portable: every parameter and buffer with a dimension is packed along dim 0 in K
equal member-major blocks (0-dim buffers such as BatchNorm's num_batches_tracked are shared), and biases and
norms are 1-D while kernels have dim > 1. `extract_member` / `stack_members` thus need no knowledge of the
architecture.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lungxray.models.kernels.bn_relu import bn_relu, use_bn_relu
from lungxray.models.kernels.conv3x3 import conv3x3, use_conv3x3
from lungxray.models.kernels.fused_stem import fused_pool_relu, fused_stem, use_fused_pool_relu, use_fused_stem
from lungxray.models.kernels.inference import kernels_allowed
from lungxray.models.kernels.patch_stem import patch_stem, use_patch_stem

__all__ = ["PackedLinear", "PackedNet", "build_model", "count_flops", "extract_member", "list_models", "member_rows",
           "model_info", "register_model", "scatter_members", "select_members", "stack_members"]  # fmt: skip

F_ = TypeVar("F_", bound=Callable[..., nn.Module])
_RESERVED = ("num_classes", "in_channels", "members")


# ---------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    description: str
    defaults: dict[str, Any]  # every tunable argument with its default (registered overrides applied)


_REGISTRY: dict[str, _Entry] = {}


def _tunable_args(factory: Callable[..., nn.Module]) -> dict[str, Any]:
    """Keyword arguments a factory accepts besides the reserved ones, with their signature defaults."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        n: (None if p.default is inspect.Parameter.empty else p.default)
        for n, p in inspect.signature(factory).parameters.items()
        if p.kind in kinds and n not in _RESERVED
    }


def register_model(name: str, description: str = "", **default_args: Any) -> Callable[[F_], F_]:
    """Decorator registering a model factory (or class) under `name`; `default_args` override its defaults.

    The factory must accept `num_classes`, `in_channels` and `members` as keywords. Duplicate names are
    refused so that a typo'd re-registration cannot silently replace a model that saved bundles refer to.
    """

    def decorator(factory: F_) -> F_:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        tunable = _tunable_args(factory)
        unknown = sorted(set(default_args) - set(tunable))
        if unknown:
            raise TypeError(f"register_model({name!r}): {factory.__name__} has no argument(s) {unknown}")
        doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
        _REGISTRY[name] = _Entry(factory, doc, {**tunable, **default_args})
        return factory

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_info(name: str) -> dict[str, Any]:
    """Name, one-line description and default arguments of a registered model."""
    entry = _entry(name)
    return {"name": name, "description": entry.description, "default_args": dict(entry.defaults)}


def build_model(name: str, num_classes: int = 3, in_channels: int = 1, members: int = 1, **kwargs: Any) -> nn.Module:
    """Instantiate a registered model.

    The result carries `build_args`, so `build_model(**m.build_args)` rebuilds the same architecture (bundles
    store it in meta.json instead of pickling code).
    """
    entry = _entry(name)
    unknown = sorted(set(kwargs) - set(entry.defaults))
    if unknown:
        raise TypeError(f"{name}: unknown argument(s) {unknown}; accepted: {sorted(entry.defaults)}")
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels), ("members", members)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {key} must be a positive int, got {value!r}")
    args = {**entry.defaults, **kwargs}
    model = entry.factory(num_classes=num_classes, in_channels=in_channels, members=members, **args)
    arch = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "members": members}
    model.build_args = {**arch, **args}  # type: ignore[assignment]  # plain dict attribute, not a submodule
    return model


# ------------------------------------------------------------------------------------------- member weights
def extract_member(state_dict: dict[str, Tensor], k: int, members: int) -> dict[str, Tensor]:
    """Member k's weights (BN running stats too) of a K-member state dict, loadable into members=1."""
    if not 0 <= k < members:
        raise ValueError(f"member index {k} out of range for {members} members")
    out = {}
    for key, t in state_dict.items():
        if t.dim() == 0:
            out[key] = t.clone()
            continue
        if t.shape[0] % members:
            raise ValueError(f"{key}: leading dim {t.shape[0]} is not a multiple of members={members}")
        out[key] = t.chunk(members)[k].clone(memory_format=torch.contiguous_format)
    return out


def stack_members(state_dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Pack K members=1 state dicts into one K-member state dict (inverse of `extract_member`).

    0-dim buffers (num_batches_tracked) are shared in a packed model; the first member's value is kept.
    """
    if not state_dicts:
        raise ValueError("stack_members needs at least one state dict")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if list(sd) != keys or any(sd[k].shape != state_dicts[0][k].shape for k in keys):
            raise ValueError(f"state dict {i} does not match state dict 0 (keys or shapes differ)")
    first = state_dicts[0]
    return {k: first[k].clone() if first[k].dim() == 0 else torch.cat([sd[k] for sd in state_dicts]) for k in keys}


SPEED_ATTRIBUTES = ("micro_batch", "fused", "fused_pool")  # per-instance speed settings, not weights


def member_rows(t: Tensor, ks: list[int], members: int) -> Tensor:
    """Members `ks` (in that order) of a packed tensor, as a new tensor; a 0-dim (shared) tensor is returned as is."""
    if t.dim() == 0:
        return t
    s = t.shape[0] // members
    return torch.cat([t.narrow(0, k * s, s) for k in ks])


@torch.no_grad()
def scatter_members(dst: dict[str, Tensor], src: dict[str, Tensor], ks: list[int], members: int) -> None:
    """Write the len(ks)-member tensors `src` into members `ks` of the `members`-member tensors `dst`, in place.

    Any memory format on either side (narrow along dim 0 is a view in every layout); 0-dim tensors are copied.
    """
    for name, target in dst.items():
        value = src[name]
        if target.dim() == 0:
            target.copy_(value)
            continue
        s = target.shape[0] // members
        for j, k in enumerate(ks):
            target.narrow(0, k * s, s).copy_(value.narrow(0, j * s, s))


def select_members(model: nn.Module, ks: list[int]) -> nn.Module:
    """A new packed network of members `ks` of `model`: same architecture, weights, buffers, device, layout.

    Why: a packed network computes every member on every step, also members that stopped early; training the
    still-active ones as a smaller network costs only their share. The per-instance speed settings
    (SPEED_ATTRIBUTES) are carried over; parameters follow `model`'s memory format (channels_last or not).
    """
    members = int(getattr(model, "members", 1))
    if not ks or len(set(ks)) != len(ks) or not all(0 <= k < members for k in ks):
        raise ValueError(f"select_members: {ks} is not a list of distinct members of 0..{members - 1}")
    small = build_model(**{**model.build_args, "members": len(ks)})  # type: ignore[arg-type, dict-item]
    for attr in SPEED_ATTRIBUTES:
        if attr in model.__dict__:
            setattr(small, attr, model.__dict__[attr])
    param = next(model.parameters())
    cl = any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
             for p in model.parameters())
    small = small.to(param.device, memory_format=torch.channels_last if cl else torch.contiguous_format)  # type: ignore[call-overload]
    full = model.state_dict()
    with torch.no_grad():
        for name, t in small.state_dict().items():
            t.copy_(member_rows(full[name], ks, members))
    small.train(model.training)
    return small


# ------------------------------------------------------------------------------------------- building blocks
class PackedLinear(nn.Module):
    """K independent linear layers: weight (K, out, in), bias (K*out,) kept 1-D like every other bias."""

    def __init__(self, in_features: int, out_features: int, members: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.members = in_features, out_features, members
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members * out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default distribution per member (fan_in = in_features, not the packed K*out*in)."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:  # (B, K, in) -> (B, K, out)
        k, o = self.members, self.out_features
        if k == 1:  # plain GEMM; view (not weight[0], whose backward zero-fills and copies the whole weight)
            return F.linear(x, self.weight.view(o, self.in_features), self.bias)
        xt = x.transpose(0, 1)  # (K, B, in)
        wt = self.weight.transpose(1, 2)  # (K, in, out)
        if self.bias is None:
            return torch.bmm(xt, wt).transpose(0, 1)
        bias = self.bias.view(k, 1, o).expand(k, x.shape[0], o)
        return torch.baddbmm(bias, xt, wt).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, members={self.members}"


def run_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """`conv(x)`, in training through the measured fp32 3x3 kernels (`kernels.conv3x3`) or the patch-stem kernel
    (`kernels.patch_stem`) where they apply."""
    if use_conv3x3(conv, x):
        return conv3x3(conv, x)
    return patch_stem(conv, x) if use_patch_stem(conv, x) else conv(x)


class ConvBlock(nn.Module):
    """Packed conv -> [BatchNorm] -> [max-pool] -> [ReLU], or conv -> pool -> BN -> ReLU with `pool_first`.

    Max-pool runs before ReLU: they commute exactly (ReLU is monotone; pool padding is -inf), and ReLU then
    touches a quarter of the values, which matters on CPU where memory traffic, not convolution, dominates.
    `pool_first` also moves BN after the pool: not equivalent (statistics of pooled values), but 4x less BN
    work; the new architectures use it, the seed's keeps the exact order.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        members: int,
        *,
        stride: int = 1,
        padding: int = 0,
        batch_norm: bool = True,
        pool: tuple[int, int, int] | None = None,  # max-pool (kernel, stride, padding)
        relu: bool = True,
        pool_first: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            members * cin, members * cout, kernel, stride, padding, groups=members, bias=not batch_norm
        )
        self.bn: nn.Module = nn.BatchNorm2d(members * cout) if batch_norm else nn.Identity()
        self.pool: nn.Module = nn.MaxPool2d(pool[0], pool[1], pool[2]) if pool else nn.Identity()
        self.relu, self.pool_first = relu, pool_first

    def forward(self, x: Tensor) -> Tensor:  # (B, K*cin, H, W) -> (B, K*cout, H', W')
        x = run_conv(self.conv, x)
        if self.pool_first or isinstance(self.pool, nn.Identity):
            return self._bn_relu(self._pool_first(x) if self.pool_first else x)
        x = self.pool(self.bn(x))
        return F.relu(x, inplace=True) if self.relu else x

    def _bn_relu(self, x: Tensor) -> Tensor:
        """BN then (with `relu`) ReLU: in training on CPU as one kernel where it applies (`kernels.bn_relu`)."""
        if use_bn_relu(self.bn, x):
            return bn_relu(self.bn, x, self.relu)  # type: ignore[arg-type]
        x = self.bn(x)
        return F.relu(x, inplace=True) if self.relu else x

    def _pool_first(self, x: Tensor) -> Tensor:
        """In training on CPU (and the training loop's validation, `kernels.inference`) the 2x2 max-pool before BN
        runs as the pool kernel (`fused_pool_relu` without its ReLU): max_pool2d's values and gradients bit for
        bit, without int64 indices and a zero-filled full-resolution gradient. (Pool -> ReLU blocks, the seed's,
        use the kernel with its ReLU: `SeedCNN`.)"""
        if kernels_allowed(self) and _is_pool2(self.pool) and not _has_hooks(self.pool) and use_fused_pool_relu(x):
            return fused_pool_relu(x, relu=False)
        return self.pool(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs plus a (1x1 projected when the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, members: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = ConvBlock(cin, cout, 3, members, stride=stride, padding=1, batch_norm=batch_norm)
        self.conv2 = ConvBlock(cout, cout, 3, members, padding=1, batch_norm=batch_norm, relu=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = ConvBlock(cin, cout, 1, members, stride=stride, batch_norm=batch_norm, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x), inplace=True)


def _init_packed(module: nn.Module, members: int) -> None:
    """Kaiming-normal (fan_out, relu) per member; on the whole grouped weight fan_out is K times too big."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                for w in m.weight.chunk(members):
                    nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class PackedNet(nn.Module):
    """Shared contract: forward = head(features(x)); (B, K*in_channels, H, W) -> logits (B, K, classes)."""

    feature_channels: int

    def __init__(self, num_classes: int, in_channels: int, members: int, image_size: int) -> None:
        super().__init__()
        self.num_classes, self.in_channels, self.members = num_classes, in_channels, members
        self.image_size = image_size  # nominal input size; only flatten heads depend on it

    def features(self, x: Tensor) -> Tensor:  # (B, K*in, H, W) -> (B, K*C, h, w), last conv map (Grad-CAM)
        raise NotImplementedError

    def head(self, f: Tensor) -> Tensor:  # (B, K*C, h, w) -> (B, K, num_classes)
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.members * self.in_channels:
            raise ValueError(
                f"expected input (B, members*in_channels={self.members * self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return self.head(self.features(x))


class GapNet(PackedNet):
    """Head shared by the global-pooling nets: per-member average pool -> dropout -> packed linear."""

    body: nn.Module

    def _make_head(self, channels: int, dropout: float) -> None:
        self.feature_channels = channels
        self.dropout = nn.Dropout(dropout)
        self.fc = PackedLinear(channels, self.num_classes, self.members)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def head(self, f: Tensor) -> Tensor:
        # sum * 1/(h*w), not mean(): mean's backward materialises a contiguous gradient that clashes with a
        # channels_last map and makes the following ReLU backward ~4x slower; sum's backward is a free expand
        z = f.sum(dim=(2, 3)) * (1.0 / (f.shape[-2] * f.shape[-1]))  # (B, K*C)
        z = z.reshape(f.shape[0], self.members, self.feature_channels)  # (B, K, C)
        return self.fc(self.dropout(z))


def _has_hooks(module: nn.Module) -> bool:
    """Forward hooks on `module`, its children or globally: they must see the modules run as written."""
    from torch.nn.modules import module as mod

    if mod._global_forward_hooks or mod._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _pool_relu_block(block: ConvBlock) -> bool:
    """conv -> 2x2/2 max-pool -> ReLU as written (no BN, no hooks): what the fused kernels compute after the conv."""
    return bool(_is_pool2(block.pool) and block.relu and not block.pool_first and isinstance(block.bn, nn.Identity)
                and not _has_hooks(block))


def _is_pool2(pool: nn.Module) -> bool:
    """A plain 2x2/2 max-pool (what the pool kernel computes)."""
    return bool(isinstance(pool, nn.MaxPool2d) and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
                and pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
                and not pool.return_indices)


# ------------------------------------------------------------------------------------------------ models
@register_model("seed_cnn", "The seed's Keras CNN: 3x (3x3 valid conv, 2x2 max-pool), flatten, dense 128, dropout.")
class SeedCNN(PackedNet):
    """The seed's design; its flatten fixes the dense layer's size (and so the input size) at build time.

    Four speed settings, none part of the architecture (so not build arguments), each measured and explained in
    docs/performance.md ("The seed network's speed settings"): `micro_batch` (conv blocks on slices of 8 images in
    training), `fused` (the first block as one C kernel), `fused_pool` (blocks 2-3's max-pool -> ReLU in C) and
    `fused_dense` (the dense layer trained from an optimizer-kept bf16 copy). Evaluation, export and Grad-CAM run
    the plain modules.
    """

    micro_batch: int = 8
    fused: bool = True
    fused_pool: bool = True

    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 1,
        members: int = 1,
        *,
        width: int = 32,
        hidden: int = 128,
        dropout: float = 0.5,
        batch_norm: bool = False,
        image_size: int = 256,
    ) -> None:
        super().__init__(num_classes, in_channels, members, image_size)
        blocks, cin, size = [], in_channels, image_size
        for c in (width, 2 * width, 4 * width):
            blocks.append(ConvBlock(cin, c, 3, members, batch_norm=batch_norm, pool=(2, 2, 0)))
            cin, size = c, (size - 2) // 2
        if size < 1:
            raise ValueError(f"seed_cnn: image_size={image_size} is too small for three conv+pool stages")
        self.blocks = nn.Sequential(*blocks)
        self.batch_norm = batch_norm
        self.feature_channels, self.feature_size = cin, size
        self.fc1 = PackedLinear(cin * size * size, hidden, members)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = PackedLinear(hidden, num_classes, members)
        _init_packed(self, members)

    def features(self, x: Tensor) -> Tensor:
        m = self.micro_batch
        if self.training and not self.batch_norm and 0 < m < x.shape[0] and not torch.compiler.is_compiling():
            return torch.cat([self._conv_blocks(part) for part in x.split(m)])  # see the class docstring
        return self._conv_blocks(x)  # (B, K*4w, s, s)

    def _conv_blocks(self, x: Tensor) -> Tensor:
        stem = self._fused_first_block(x)  # see the class docstring
        pool = self.fused and self.fused_pool and self.training and not self.batch_norm and use_fused_pool_relu(x)
        if not (stem or pool) or self.blocks._forward_hooks or self.blocks._forward_pre_hooks:
            return self.blocks(x)
        for i, block in enumerate(cast(list[ConvBlock], list(self.blocks))):
            if i == 0 and stem:
                x = fused_stem(x, block.conv.weight, cast(Tensor, block.conv.bias), block.conv.groups)
            elif i > 0 and pool and _pool_relu_block(block):
                x = run_conv(block.conv, x)
                x = fused_pool_relu(x) if use_fused_pool_relu(x) else F.relu(block.pool(x), inplace=True)
            else:
                x = block(x)
        return x

    def _fused_first_block(self, x: Tensor) -> bool:
        """Training without BN, the kernel available for these tensors, and nobody hooked into the first block."""
        if not (self.fused and self.training and not self.batch_norm):
            return False
        first = cast(ConvBlock, self.blocks[0])
        return use_fused_stem(first.conv, x) and _pool_relu_block(first)

    def head(self, f: Tensor) -> Tensor:
        if f.shape[-1] != self.feature_size or f.shape[-2] != self.feature_size:
            raise ValueError(
                f"seed_cnn was built for {self.image_size}x{self.image_size} inputs "
                f"(pass image_size= to build_model); got a {tuple(f.shape[-2:])} feature map"
            )
        z = f.reshape(f.shape[0], self.members, -1)  # (B, K, C*s*s), C-major within a member
        return self.fc2(self.dropout(F.relu(self.fc1(z), inplace=True)))


register_model("seed_cnn_bn", "seed_cnn with BatchNorm after every conv (conv without bias).", batch_norm=True)(SeedCNN)


@register_model(
    "compact_cnn", "Fast CNN: 4x4 stride-4 patch stem, 4 conv-BN-ReLU layers (2 max-pools), global average pool."
)
class CompactCNN(GapNet):
    """Downsamples 16x before the wide layers and pools globally: ~0.19 GFLOPs, ~0.25 M params at 256x256.

    The patch stem (16 pixels -> `width` channels, lossless-capable at width 16) avoids a full-resolution
    feature map, whose BN/pool traffic and inefficient 1-channel grouped conv dominated a step on CPU: it is
    ~1.5x faster than a 5x5 stride-2 stem + max-pool at K=5.
    """

    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 1,
        members: int = 1,
        *,
        width: int = 16,
        dropout: float = 0.2,
        batch_norm: bool = True,
        image_size: int = 256,
    ) -> None:
        super().__init__(num_classes, in_channels, members, image_size)
        w, k, bn = width, members, batch_norm
        self.body = nn.Sequential(
            ConvBlock(in_channels, w, 4, k, stride=4, batch_norm=bn),  # S/4
            ConvBlock(w, 2 * w, 3, k, padding=1, batch_norm=bn, pool=(2, 2, 0), pool_first=True),  # S/8
            ConvBlock(2 * w, 4 * w, 3, k, padding=1, batch_norm=bn, pool=(2, 2, 0), pool_first=True),  # S/16
            ConvBlock(4 * w, 8 * w, 3, k, padding=1, batch_norm=bn),
            ConvBlock(8 * w, 8 * w, 3, k, padding=1, batch_norm=bn),
        )
        self._make_head(8 * w, dropout)
        _init_packed(self, members)


@register_model("resnet_small", "Small ResNet: 7x7 stride-2 stem + max-pool, 4 basic blocks, global average pool.")
class ResNetSmall(GapNet):
    """ResNet-10-like (one basic block per stage), widths w..8w: ~0.15 GFLOPs, ~0.3 M params at width 16."""

    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 1,
        members: int = 1,
        *,
        width: int = 16,
        dropout: float = 0.2,
        batch_norm: bool = True,
        image_size: int = 256,
    ) -> None:
        super().__init__(num_classes, in_channels, members, image_size)
        w, k = width, members
        layers: list[nn.Module] = [
            ConvBlock(in_channels, w, 7, k, stride=2, padding=3, batch_norm=batch_norm, pool=(3, 2, 1), pool_first=True)
        ]  # S/4
        cin = w
        for i, c in enumerate((w, 2 * w, 4 * w, 8 * w)):
            layers.append(BasicBlock(cin, c, 1 if i == 0 else 2, k, batch_norm))  # S/4, S/8, S/16, S/32
            cin = c
        self.body = nn.Sequential(*layers)  # (B, K*8w, S/32, S/32)
        self._make_head(8 * w, dropout)
        _init_packed(self, members)


# --------------------------------------------------------------------------------------------------- FLOPs
def count_flops(model: nn.Module, image_size: int = 256) -> int:
    """Forward FLOPs (2 x multiply-accumulates of convs and linears) per image per member.

    Norms, activations and pooling are left out; they are memory-bound, so this is the figure a FLOP/s rate is
    meaningful for.
    """
    members, in_ch = getattr(model, "members", 1), getattr(model, "in_channels", 1)
    macs = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal macs
        macs += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: Any, _inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal macs
        macs += out.numel() * m.in_features

    handles = [
        m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear | PackedLinear)
    ]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, members * in_ch, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return 2 * macs // members
