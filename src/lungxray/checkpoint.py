"""Training checkpoints as plain tensors (safetensors) + JSON, written atomically every epoch.

A checkpoint holds the model, the best weights so far, the optimizer, the training state and every random
generator (numpy for sampling, torch for dropout, the augmenter's own), so a run killed at any point resumes
exactly where its last epoch ended. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lungxray.augment import Augmenter
from lungxray.files import atomic_write, write_json

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"


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


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    best_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    train_state: Any,
    rng: np.random.Generator,
    augmenter: Augmenter,
) -> None:
    """Write the tensors first, then the JSON that points at them: the JSON's epoch is the resumable one."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors |= {f"best.{k}": v.contiguous().cpu() for k, v in best_state.items()}
    opt_tensors, opt_meta = _flat_optimizer(optimizer)
    tensors |= opt_tensors
    tensors["rng.torch"] = torch.get_rng_state()
    tensors |= {f"rng.augment.{k}": v.cpu() for k, v in augmenter.state_dict().items()}
    atomic_write(run_dir / CHECKPOINT_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    write_json(run_dir / CHECKPOINT_JSON, {
        "state": dataclasses.asdict(train_state),
        "optimizer": opt_meta,
        "numpy_rng": rng.bit_generator.state,
    })


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT_JSON).is_file() and (run_dir / CHECKPOINT_TENSORS).is_file()


def load_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    augmenter: Augmenter,
    state_cls: type,
) -> tuple[Any, dict[str, torch.Tensor], np.random.Generator]:
    """Restore model, optimizer and generators in place; return (train state, best weights, numpy rng)."""
    meta = json.loads((run_dir / CHECKPOINT_JSON).read_text())
    device = next(model.parameters()).device
    tensors = load_file(str(run_dir / CHECKPOINT_TENSORS), device=str(device))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v.clone() for k, v in tensors.items() if k.startswith("best.")}
    _restore_optimizer(optimizer, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"].cpu())
    augmenter.load_state_dict({k[12:]: v for k, v in tensors.items() if k.startswith("rng.augment.")})
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["numpy_rng"]
    return state_cls(**meta["state"]), best, rng


def remove_checkpoint(run_dir: Path) -> None:
    for name in (CHECKPOINT_JSON, CHECKPOINT_TENSORS):
        (run_dir / name).unlink(missing_ok=True)
