"""Training checkpoints as plain tensors (safetensors) with their JSON state inside, written atomically every epoch.

A checkpoint holds the model, the best weights so far, the optimizer, the training state, every random
generator (numpy for sampling, torch for dropout, the augmenter's own) and the member plan (bootstrap indices),
so a run killed at any point resumes exactly where its last epoch ended. It is one file, so the tensors and the
state can never be from different epochs. Nothing is pickled. A digest of every tensor and of the JSON state is
stored in the file and checked on resume: a flipped byte is refused in one line instead of resuming silently wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lungxray.io.files import atomic_write
from lungxray.training.averaging import WeightAverage
from lungxray.training.plan import MemberPlan
from lungxray.transforms.geometric import Augmenter

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"  # written by earlier versions beside the tensors; only ever removed
CHECKPOINT_FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (unreadable, other format, other data or model)."""


def _flat_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    # Saved tensors are contiguous; a channels_last parameter needs its moments in the same layout, or the fused
    # optimizers (which walk raw memory) silently pair each weight with another weight's moments.
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    best_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    train_state: Any,
    rng: np.random.Generator,
    augmenter: Augmenter,
    plan: MemberPlan | None = None,
    average: dict[str, torch.Tensor] | None = None,
) -> None:
    """One file, renamed into place: a SIGKILL at any moment leaves either the previous or the new checkpoint.

    Tensors (weights, best weights, optimizer moments, torch/augmenter generators, the member plan) are the
    safetensors payload; everything else (training state, optimizer scalars, numpy generator) is JSON in the
    same file's metadata, so the two can never come from different epochs.
    """
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors |= {f"best.{k}": v.contiguous().cpu() for k, v in best_state.items()}
    tensors |= {f"average.{k}": v.contiguous().cpu() for k, v in (average or {}).items()}
    opt_tensors, opt_meta = _flat_optimizer(optimizer)
    tensors |= opt_tensors
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors |= {f"rng.augment.{k}": v.cpu() for k, v in augmenter.state_dict().items()}
    if plan is not None:  # the bootstrap samples: a resumed run must train each member on the same images
        tensors["plan.train_index"] = torch.as_tensor(np.ascontiguousarray(plan.train_index, dtype=np.int64))
        tensors["plan.val_mask"] = torch.as_tensor(np.ascontiguousarray(plan.val_mask, dtype=np.uint8))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "epoch": int(train_state.epoch),
        "state": dataclasses.asdict(train_state),
        "optimizer": opt_meta,
        "numpy_rng": rng.bit_generator.state,
    }
    text = json.dumps(meta, default=_jsonable)  # Infinity/NaN kept (best_monitor starts at inf)
    header = {"checkpoint": text, "digest": tensors_digest(tensors, text)}
    atomic_write(run_dir / CHECKPOINT_TENSORS, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def tensors_digest(tensors: dict[str, torch.Tensor], text: str = "") -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name) and `text`."""
    h = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable in a checkpoint: {type(obj).__name__}")


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_TENSORS).is_file()


def checkpoint_epoch(run_dir: Path) -> int | None:
    """The last completed epoch recorded in run_dir's checkpoint, or None when there is no readable one."""
    try:
        return int(_read_meta(run_dir / CHECKPOINT_TENSORS)["epoch"])
    except (OSError, CheckpointError, KeyError, ValueError):
        return None


def _read_header(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a lungxray checkpoint ({type(exc).__name__}: {exc})") from exc


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(_read_header(path)["checkpoint"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a lungxray checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a lungxray checkpoint (its state is not an object)")
    return meta


def load_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    augmenter: Augmenter,
    state_cls: type,
    plan: MemberPlan | None = None,
    average: WeightAverage | None = None,
) -> tuple[Any, dict[str, torch.Tensor], np.random.Generator]:
    """Restore model, optimizer, generators and the weight average in place; return (train state, best
    weights, numpy rng).

    With `plan`, refuse a checkpoint written for a different member plan (the data or the seed changed).
    """
    path = run_dir / CHECKPOINT_TENSORS
    meta = _read_meta(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format")
        raise CheckpointError(f"{path}: checkpoint format {found}, this lungxray reads {CHECKPOINT_FORMAT}")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a lungxray checkpoint ({exc})") from exc
    header = _read_header(path)
    if "digest" in header and header["digest"] != tensors_digest(tensors, header["checkpoint"]):
        raise CheckpointError(f"{path}: content does not match its digest (damaged); start a new run or restore it")
    try:
        return _restore(path, meta, tensors, model, optimizer, augmenter, state_cls, plan, average)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{path}: state does not fit this run ({type(exc).__name__}: {exc})") from exc


def _restore(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, augmenter: Augmenter, state_cls: type, plan: MemberPlan | None,
             average: WeightAverage | None) -> tuple[Any, dict[str, torch.Tensor], np.random.Generator]:
    if plan is not None and "plan.train_index" in tensors:
        same = np.array_equal(tensors["plan.train_index"].numpy(), plan.train_index) and np.array_equal(
            tensors["plan.val_mask"].numpy().astype(bool), plan.val_mask
        )
        if not same:
            raise CheckpointError(
                f"{path}: written for other training samples than this data and config give (did the data folder "
                "change since the run started?); start a new run"
            )
    device = next(model.parameters()).device
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: does not match the model of this run's config.yaml") from exc
    best = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best.")}
    saved_average = {k[8:]: v for k, v in tensors.items() if k.startswith("average.")}
    if (average is not None) != bool(saved_average):
        raise CheckpointError(f"{path}: written {'with' if saved_average else 'without'} a weight average "
                              "(train.ema_epochs), which this run's config.yaml does not match")
    if average is not None:
        average.load(saved_average)
    _restore_optimizer(optimizer, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    augmenter.load_state_dict({k[12:]: v for k, v in tensors.items() if k.startswith("rng.augment.")})
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["numpy_rng"]
    return state_cls(**meta["state"]), best, rng


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete temporary files that a killed process left mid-write (`.<name>.<random>.tmp`, see files.py)."""
    stale = [p for p in run_dir.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def remove_checkpoint(run_dir: Path) -> None:
    """Once the bundle is complete: the checkpoint, a checkpoint.json of older versions, and stale temporary files."""
    for name in (CHECKPOINT_JSON, CHECKPOINT_TENSORS):
        (run_dir / name).unlink(missing_ok=True)
    remove_stale_temp_files(run_dir)


def member_record(state: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """member.json of a finished sequential member: its training state and the digest of its weights."""
    return {**dataclasses.asdict(state), "digest": tensors_digest(tensors)}


def load_member(member_dir: Path, model: torch.nn.Module, state_cls: type) -> Any:
    """Load a finished sequential member (members/<k>/) into `model`; CheckpointError when damaged."""
    path = member_dir / "member.safetensors"
    try:
        record = json.loads((member_dir / "member.json").read_text())
        tensors = load_file(str(path), device="cpu")
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: not a readable finished member ({type(exc).__name__}: {exc})") from exc
    digest = record.pop("digest", None) if isinstance(record, dict) else None
    if digest is not None and digest != tensors_digest(tensors):
        raise CheckpointError(f"{path}: content does not match the digest in member.json (damaged); delete "
                              f"{member_dir} to train that member again")
    try:
        model.load_state_dict(tensors)
        return state_cls(**record)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: does not fit this run ({type(exc).__name__})") from exc
