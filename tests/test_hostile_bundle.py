"""Issue 18, bundles and checkpoints: every damaged, replaced or hand-edited file is refused in one line that names
the file and the field, before use; never a traceback, never silently wrong answers."""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from lungxray.cli import main
from lungxray.inference.bundle import (
    BundleError,
    load_bundle,
    read_info,
    read_meta,
    seal_bundle,
    update_meta,
    write_bundle_file,
)
from lungxray.inference.bundlemeta import BundleMeta, InputContract
from lungxray.speed.bench import _scratch_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _scratch_bundle(tmp_path_factory.mktemp("hostile") / "b", "compact_cnn", 2, 32)


def _meta(key: str, value: object, *, seal: bool = False) -> Callable[[Path], None]:
    """Edit one meta.json field by hand (seal=True: and re-seal it, as a careful attacker or an old tool would)."""
    def change(d: Path) -> None:
        meta = json.loads((d / "meta.json").read_text())
        node = meta
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
        text = json.dumps(meta)
        (d / "meta.json").write_text(text)
        if seal:
            meta.pop("digests", None)
            (d / "meta.json").write_text(json.dumps(meta))

    return change


_DELETE = object()


def _flip(name: str, offset: int = -100) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        data = bytearray((d / name).read_bytes())
        data[offset] ^= 0xFF
        (d / name).write_bytes(bytes(data))

    return change


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("the pickle ran",))


def _with_legacy(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """The same damage to a bundle without digests (written before them): the schema alone must catch it."""
    def both(d: Path) -> None:
        meta = json.loads((d / "meta.json").read_text())
        meta.pop("digests")
        (d / "meta.json").write_text(json.dumps(meta))
        change(d)

    return both


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "temperature NaN": (_meta("temperature", float("nan"), seal=True), r"meta\.json: temperature: nan is not a finite"),
    "temperature 0": (_meta("temperature", 0, seal=True), r"meta\.json: temperature: 0\.0 is not a finite number"),
    "meta is []": (_write("meta.json", b"[]"), r"meta\.json: the top level must be an object, got list"),
    "std 0": (_meta("input.std", 0, seal=True), r"meta\.json: input\.std: 0\.0 is not a finite number in \(0"),
    "size 100000": (_meta("input.size", 100000, seal=True), r"meta\.json: input\.size: 100000 is not in \[16, 2048\]"),
    "no input": (_meta("input", _DELETE, seal=True), r"meta\.json: input: missing"),
    "classes not a list": (_meta("classes", "covid", seal=True), r"meta\.json: classes: expected a list"),
    "huge width": (_meta("arch_args.width", 10**9, seal=True), r"meta\.json: arch_args\.width: 1000000000 is not a"),
    "unknown arch": (_meta("arch", "os.system", seal=True), r"meta\.json: arch: 'os\.system' is not a known arch"),
    "weights truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:999]),
                          r"model\.safetensors: content does not match the digest in meta\.json"),
    "weights empty": (_write("model.safetensors", b""), r"model\.safetensors: content does not match the digest"),
    "weights a pickle": (_write("model.safetensors", pickle.dumps(_Evil())), r"model\.safetensors: content does not"),
    "weights byte flipped": (_flip("model.safetensors"), r"model\.safetensors: content does not match the digest"),
    "classes reordered": (_meta("classes", ["normal", "covid", "pneumonia"]),
                          r"meta\.json: content does not match its digest"),
    "legacy: weights truncated": (_with_legacy(lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:999])), r"model\.safetensors: not a readable safetensors file"),
    "legacy: weights empty": (_with_legacy(_write("model.safetensors", b"")),
                              r"model\.safetensors: not a readable safetensors file"),
    "legacy: weights a pickle": (_with_legacy(_write("model.safetensors", pickle.dumps(_Evil()))),
                                 r"model\.safetensors: not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_bundles_are_refused_in_one_line(case: str, bundle: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    change, pattern = CASES[case]
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    change(copy)
    with pytest.raises(BundleError, match=pattern) as info:
        load_bundle(copy)
    assert "\n" not in str(info.value)
    image = tmp_path / "x.npy"
    np.save(image, np.zeros((8, 8), np.uint8))
    assert main(["predict", str(copy), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "the pickle ran" not in err, err
    assert re.search(pattern, err), err


def test_the_typed_meta_and_the_plain_dict_agree(bundle: Path) -> None:
    b = load_bundle(bundle)
    assert isinstance(b.info, BundleMeta) and isinstance(b.info.input, InputContract)
    assert b.info.classes == tuple(b.meta["classes"]) and b.info.input.size == b.meta["input"]["size"] == 32
    assert set(b.meta["digests"]) == {"model.safetensors", "meta.json"}
    assert read_info(bundle) == b.info


def test_unknown_sections_are_kept_and_update_meta_reseals(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    update_meta(copy, ood={"threshold": 0.4, "anything": [1, 2]}, temperature=2.0)
    b = load_bundle(copy)
    assert b.info is not None and b.info.extra["ood"]["anything"] == [1, 2] and b.info.temperature == 2.0


def test_extra_tensor_files_are_covered_by_the_digest(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    write_bundle_file(copy, "features.safetensors", {"mean": torch.ones(4)}, ood={"file": "features.safetensors"})
    assert "features.safetensors" in read_meta(copy)["digests"]
    load_bundle(copy)
    _flip("features.safetensors", -2)(copy)
    with pytest.raises(BundleError, match=r"features\.safetensors: content does not match the digest"):
        load_bundle(copy)
    with pytest.raises(ValueError, match="not a plain file name"):
        write_bundle_file(copy, "../escape.safetensors", {"x": torch.ones(1)})


def test_a_bundle_without_digests_loads_with_a_warning_and_can_be_sealed(bundle: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    copy = tmp_path / "legacy"
    shutil.copytree(bundle, copy)
    _with_legacy(lambda d: None)(copy)
    with caplog.at_level(logging.WARNING):
        load_bundle(copy)
    assert "has no digests" in caplog.text
    seal_bundle(copy)
    _meta("classes", ["normal", "covid", "pneumonia"])(copy)
    with pytest.raises(BundleError, match="does not match its digest"):
        load_bundle(copy)


def test_non_finite_weights_are_never_written_or_loaded(tmp_path: Path) -> None:
    from lungxray.inference.bundle import save_bundle
    from lungxray.models.nets import build_model

    model = build_model("compact_cnn", members=1, image_size=32)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    meta = {"name": "x", "classes": ["a", "b", "c"], "arch": "compact_cnn", "arch_args": {"image_size": 32},
            "members": 1, "input": {"size": 32, "channels": 1, "mean": 0.5, "std": 0.25}}
    with pytest.raises(BundleError, match="holds NaN or infinite values"):
        save_bundle(tmp_path / "nan", model, meta)
    assert not (tmp_path / "nan" / "meta.json").exists()
    with pytest.raises(BundleError, match=r"invalid meta\.json \(temperature: nan is not a finite number"):
        save_bundle(tmp_path / "t", build_model("compact_cnn", members=1, image_size=32),
                    {**meta, "temperature": float("nan")})
    assert not (tmp_path / "t").exists()


def test_damaged_checkpoints_are_refused(tmp_path: Path) -> None:
    from lungxray.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from lungxray.training.loop import TrainState
    from lungxray.transforms.geometric import Augmenter, resolve_params

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    augmenter = Augmenter(resolve_params("none"), seed=0)
    state = TrainState(lr=0.1, batch_size=2)
    rng = np.random.default_rng(0)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path, model, best, optimizer, state, rng, augmenter)
    path = tmp_path / "checkpoint.safetensors"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the user's umask, not 0600
    load_checkpoint(tmp_path, model, optimizer, augmenter, TrainState)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    _flip("checkpoint.safetensors", 8 + header_len + 3)(tmp_path)  # a byte of the first tensor
    with pytest.raises(CheckpointError, match=r"checkpoint\.safetensors: content does not match its digest"):
        load_checkpoint(tmp_path, model, optimizer, augmenter, TrainState)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"not a lungxray checkpoint"):
        load_checkpoint(tmp_path, model, optimizer, augmenter, TrainState)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bundle_files_get_the_users_umask(bundle: Path) -> None:
    for name in ("model.safetensors", "meta.json"):
        assert (bundle / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name


def test_save_bundle_covers_every_tensor_file_of_the_folder(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from lungxray.inference.bundle import save_bundle
    from lungxray.models.nets import build_model

    out = tmp_path / "b"
    out.mkdir()
    save_file({"x": torch.ones(3)}, str(out / "features.safetensors"))  # written before the bundle, as ood does
    save_file({"x": torch.ones(3)}, str(out / "checkpoint.safetensors"))  # removed after training: not covered
    meta = {"name": "x", "classes": ["a", "b"], "arch": "compact_cnn", "arch_args": {"image_size": 32},
            "members": 1, "input": {"size": 32, "channels": 1, "mean": 0.5, "std": 0.25}}
    save_bundle(out, build_model("compact_cnn", num_classes=2, members=1, image_size=32), meta,
                extra_files={"more.safetensors": {"y": torch.zeros(2)}})
    assert set(read_meta(out)["digests"]) == {"model.safetensors", "features.safetensors", "more.safetensors",
                                              "meta.json"}
    (out / "checkpoint.safetensors").unlink()
    load_bundle(out)


def test_damaged_sequential_members_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from lungxray.io.files import write_json
    from lungxray.training.checkpoint import CheckpointError, load_member, member_record
    from lungxray.training.loop import TrainState

    model = torch.nn.Linear(4, 2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    write_json(tmp_path / "member.json", member_record(TrainState(lr=0.1, batch_size=2, epoch=3), sd))
    save_file(sd, str(tmp_path / "member.safetensors"))
    assert load_member(tmp_path, model, TrainState).epoch == 3
    header_len = int.from_bytes((tmp_path / "member.safetensors").read_bytes()[:8], "little")
    _flip("member.safetensors", 8 + header_len + 1)(tmp_path)
    with pytest.raises(CheckpointError, match=r"member\.safetensors: content does not match the digest"):
        load_member(tmp_path, model, TrainState)
    (tmp_path / "member.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="not a readable finished member"):
        load_member(tmp_path, model, TrainState)
