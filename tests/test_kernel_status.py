"""The C kernels report what they could not do: a kernel that returned silently without its work space would hand
the caller uninitialised memory as a result."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lungxray.models.kernels import bn_relu
from lungxray.models.kernels import conv3x3 as c3

CSRC = Path(c3.__file__).with_name("csrc")


def test_every_exported_kernel_returns_its_status() -> None:
    for source in sorted(CSRC.glob("*.c")):
        text = source.read_text()
        assert not re.findall(r"^void \w+\(", text, flags=re.M), f"{source.name}: an exported kernel returns nothing"
        assert re.findall(r"^int \w+\(", text, flags=re.M), source.name


@pytest.mark.skipif(not bn_relu.bn_relu_available(), reason="the kernel needs gcc and AVX2+FMA")
def test_a_kernel_without_memory_for_its_work_space_raises() -> None:
    lib = bn_relu._kernels.loaded()
    channels = 1 << 58  # its per-channel scratch (2 C doubles) cannot be allocated; it fails before reading x
    with pytest.raises(MemoryError, match="bn_relu_forward"):
        lib.bn_relu_forward(None, None, None, None, None, None, None, 1, channels, 1e-5, 1, 1)


@pytest.mark.skipif(not c3.conv3x3_available(), reason="the kernel needs gcc and AVX2+FMA")
def test_a_kernel_refuses_arguments_it_does_not_take() -> None:
    with pytest.raises(RuntimeError, match="conv3x3_winograd_forward refused"):  # F(3x3, 3x3) is not a tile
        c3._kernels.loaded().conv3x3_winograd_forward(None, None, None, None, 1, 8, 8, 1, 16, 16, 1, 3, 1)
