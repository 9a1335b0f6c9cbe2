"""ONNX export of a whole bundle (normalisation, all members, ensembling, temperature) and an ONNX Runtime engine.

Graph contract (written into the ONNX file's metadata too):

- input `image`: float32 (N, 1, S, S), raw pixel values 0..255 of images already decoded and preprocessed under
  the bundle's contract (`Predictor.preprocess`: resize to S, optional border crop and standardisation). Float
  rather than uint8 so that any runtime or framework can feed it without a cast; the batch axis is dynamic.
- inside: x / 255, (x - mean) / std, the packed network (its stem reads the one input channel for all K members,
  `_shared_input_stem`), softmax per member, the mean over members, log, / temperature, softmax.
- outputs `probs` (N, C) calibrated ensemble probabilities, `member_probs` (N, K, C) uncalibrated member ones,
  `member_features` (N, K, D) each member's penultimate features, from which the engine computes the same
  out-of-distribution score as PyTorch (`lungxray.sites.ood`; the training statistics stay in the bundle).

An opt-in int8 variant (`lungxray.inference.quantize`, `lungxray export --quantize int8`) keeps this contract.

The TorchScript exporter is used by default: on torch 2.13 it exports these models in under a second at the
requested opset with a parity of ~1e-7, whereas the torch.export-based exporter (`dynamo=True`) takes 5-10 s per
model here and only emits opset >= 18 (its down-conversion to 17 fails on ReduceMean).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from lungxray.inference.bundle import WEIGHTS, load_bundle, read_meta
from lungxray.inference.predictor import Predictor, run_batches
from lungxray.io.files import atomic_write
from lungxray.models.nets import PackedNet
from lungxray.sites.ood import penultimate

log = logging.getLogger(__name__)

__all__ = ["ONNX_NAME", "OnnxPredictor", "ParityError", "ensure_onnx", "export_checked", "export_onnx", "parity_check"]

ONNX_NAME = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAMES = ("probs", "member_probs", "member_features")
PARITY_TOLERANCE = 1e-4
_FINGERPRINT_KEY = "lungxray.bundle_fingerprint"
ONNX_THREADS = 1  # intra-op threads of the onnx engine; see `open_session`


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree on the same images by more than the tolerance."""


class _Deployable(nn.Module):
    """The bundle's model plus everything `Predictor.predict_images` does around it, as one traceable module.

    With `shared_stem` (see `_shared_input_stem`) the model is a copy whose first convolution reads the one input
    channel directly instead of K identical copies of it.
    """

    def __init__(self, model: nn.Module, members: int, mean: float, std: float, temperature: float,
                 shared_stem: bool = False) -> None:
        super().__init__()
        model = copy.deepcopy(model)  # the tap below must not touch the bundle's own model
        self.tap = _tap_penultimate(model)
        self.model, self.members, self.shared_stem = model, members, shared_stem
        self.mean, self.std, self.temperature = float(mean), float(std), float(temperature)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # (N, 1, S, S) pixels 0..255
        z = (x * (1.0 / 255.0) - self.mean) * (1.0 / self.std)  # same expression as runtime.normalize
        if self.shared_stem:
            net = cast(PackedNet, self.model)
            logits = net.head(net.features(z))  # (N, K, C)
        else:
            logits = self.model(z.expand(-1, self.members, -1, -1))  # (N, K, C)
        member_probs = logits.softmax(-1)
        mean = member_probs.mean(1).clamp_min(1e-12)  # (N, C)
        return (mean.log() / self.temperature).softmax(-1), member_probs, self.tap.seen


class _Tap(nn.Module):
    """Passes through to `inner` and keeps its input: the penultimate features become a graph output."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen = torch.zeros(0)

    def forward(self, x: Tensor) -> Tensor:
        self.seen = x
        return self.inner(x)


def _tap_penultimate(model: nn.Module) -> _Tap:
    """Replace the model's output layer (`ood.penultimate`) by a `_Tap` around it, in place."""
    target = penultimate(model)
    for module in model.modules():
        for name, child in module.named_children():
            if child is target:
                tap = _Tap(child)
                setattr(module, name, tap)
                return tap
    raise ValueError("the output layer was not found among the model's children")


def _shared_input_stem(model: nn.Module, members: int, size: int) -> nn.Module | None:
    """A copy of `model` whose first convolution is dense over one input channel, or None where that is not exact.

    Every member sees the same image, so the packed stem `Conv2d(K, K*C, groups=K)` applied to K copies of it
    equals `Conv2d(1, K*C)` applied once, with the very same weight tensor (K*C, 1, kh, kw). ONNX Runtime runs
    the dense form ~5x faster (its NCHWc kernels take a 1-channel dense conv directly, whereas the grouped one
    goes through a layout reorder and one small GEMM per member) and the Expand of the input disappears: ~1.2 ms
    of ~14 ms for the 10-member reference. Only done where the first convolution reads the model's input itself
    and the copy reproduces the original on a probe image (else the generic graph is exported).
    """
    if not isinstance(model, PackedNet) or model.in_channels != 1:
        return None
    probe = torch.linspace(-2.0, 2.0, size * size).reshape(1, 1, size, size)
    replicated = probe.expand(-1, members, -1, -1)
    first: list[tuple[nn.Conv2d, bool]] = []

    def spy(module: nn.Module, args: tuple[Any, ...]) -> None:
        if not first and isinstance(module, nn.Conv2d):
            first.append((module, args[0] is replicated))

    hooks = [m.register_forward_pre_hook(spy) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            expected = model(replicated)
    finally:
        for h in hooks:
            h.remove()
    if not first or not first[0][1] or first[0][0].groups != members or first[0][0].weight.shape[1] != 1:
        return None
    name = next(n for n, m in model.named_modules() if m is first[0][0])
    dense = copy.deepcopy(model)
    conv = dense.get_submodule(name)
    conv.groups, conv.in_channels = 1, 1  # type: ignore[assignment]  # same weight, now (K*C, 1 input channel)
    try:
        with torch.no_grad():
            got = dense.head(dense.features(probe))
    except RuntimeError:  # another layer also reads the K-channel input
        return None
    return dense if got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5) else None


def bundle_fingerprint(run_dir: str | Path, meta: dict[str, Any] | None = None) -> str:
    """sha256 of the weights and of every meta field the graph bakes in, to spot a stale model.onnx."""
    run_dir = Path(run_dir)
    meta = meta if meta is not None else read_meta(run_dir)
    baked = {k: meta.get(k) for k in ("classes", "arch", "arch_args", "members", "temperature")}
    baked["input"] = {k: meta["input"].get(k) for k in ("size", "mean", "std")}
    h = hashlib.sha256(json.dumps(baked, sort_keys=True, default=str).encode())
    with (run_dir / WEIGHTS).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _to_onnx_bytes(module: nn.Module, example: Tensor, opset: int, dynamo: bool) -> bytes:
    if dynamo:
        if opset < 18:
            log.info("the dynamo exporter emits opset >= 18; using 18 instead of %d", opset)
            opset = 18
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=opset, verbose=False,
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
        )
        if program is None:
            raise RuntimeError("torch.onnx.export (dynamo) returned no program")
        return program.model_proto.SerializeToString()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # Shape checks in models.py are traced as constants (K and S are fixed per bundle), and the TorchScript
        # exporter's deprecation notice is known (see the module docstring); neither concerns the exported graph.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module, (example,), buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects
            dynamo=False, opset_version=opset, do_constant_folding=True,
            dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, *OUTPUT_NAMES)}, input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
        )
    return buf.getvalue()


def _with_metadata(data: bytes, meta: dict[str, Any], fingerprint: str) -> bytes:
    import onnx

    proto = onnx.load_from_string(data)
    contract = meta["input"]
    proto.doc_string = ("lungxray model: input 'image' float32 (N, 1, S, S) raw pixels 0..255 after the bundle's "
                        "preprocessing; outputs 'probs' (N, C) calibrated, 'member_probs' (N, K, C).")
    props = {
        "lungxray.classes": json.dumps(list(meta["classes"])),
        "lungxray.input": json.dumps(contract, default=str),
        "lungxray.members": str(meta["members"]),
        "lungxray.temperature": repr(float(meta.get("temperature", 1.0))),
        "lungxray.arch": str(meta.get("arch")),
        _FINGERPRINT_KEY: fingerprint,
    }
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_checked(run_dir: str | Path, out_path: str | Path, opset: int = 17, *, dynamo: bool = False,
                   check: bool = True) -> tuple[Path, float | None]:
    """`export_onnx`, also returning the parity check's max |probability difference| (None without `check`)."""
    run_dir, out = Path(run_dir), Path(out_path)
    read_meta(run_dir)  # a clear BundleError for a folder that is not a model
    bundle = load_bundle(run_dir, "cpu")
    meta, model = bundle.meta, bundle.model.float().eval()
    size = int(meta["input"]["size"])
    contract, temperature = meta["input"], float(meta.get("temperature", 1.0))
    dense = _shared_input_stem(model, bundle.members, size)
    module = _Deployable(model if dense is None else dense, bundle.members, contract["mean"], contract["std"],
                         temperature, shared_stem=dense is not None)
    example = torch.full((2, 1, size, size), 128.0)
    data = _with_metadata(_to_onnx_bytes(module.eval(), example, opset, dynamo), meta,
                          bundle_fingerprint(run_dir, meta))

    diff: float | None = None

    def write(tmp: Path) -> None:
        nonlocal diff
        tmp.write_bytes(data)
        if check:  # only a model that passes the parity check is moved into place
            diff = parity_check(Predictor(bundle), tmp)
            log.info("exported %s: ONNX Runtime vs PyTorch max |diff| %.2e", out, diff)

    return atomic_write(out, write), diff


def export_onnx(run_dir: str | Path, out_path: str | Path, opset: int = 17, *, dynamo: bool = False,
                check: bool = True) -> Path:
    """Export the whole bundle at `run_dir` to `out_path` (written atomically); see the module docstring.

    With `check` the file lands only after ONNX Runtime reproduced PyTorch's probabilities within 1e-4
    (`ParityError` otherwise).
    """
    return export_checked(run_dir, out_path, opset, dynamo=dynamo, check=check)[0]


def parity_images(size: int, n: int = 8, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 test inputs: black, white, a gradient and noise (extreme logits included)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    fixed = [np.zeros((size, size)), np.full((size, size), 255.0), np.add.outer(ramp, ramp) / 2]
    noise = [rng.integers(0, 256, (size, size)) for _ in range(max(n - len(fixed), 0))]
    return np.stack(fixed + noise)[:n].astype(np.uint8)


def open_session(path: str | Path, device: str = "cpu", threads: int = ONNX_THREADS) -> Any:
    """An ONNX Runtime session set up for batch-1 latency on a CPU that other processes share.

    Chosen by measurement (10-member reference, 2 shared cores, load 5-8; docs/performance.md "Inference"):

    - Intra-op threads do not spin (`session.intra_op.allow_spinning=0`). ONNX Runtime's pool busy-waits between
      operators by default, and on a busy machine the spinning thread takes the core the working one needs:
      20-24 ms median with spinning, 13-16 ms without, under load 5.
    - One intra-op thread by default (`threads`, 0 = one per core as ONNX Runtime would choose). Under load 5-8,
      a second thread never lowered the median (13.0 against 13.6 ms, 19.0 against 22.8 ms) and made the p99
      worse; it only helps on an idle machine. A server already spreads concurrent requests over the cores.
    - Full graph optimisation (the default, stated to keep it so): its NCHWc layout pass is what makes the
      convolutions fast; the `extended` level, without it, took 20 ms instead of 14 ms on one thread.
    - Sequential execution: the graph is a chain, the parallel executor would only add scheduling.
    """
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("the onnx engine has no CUDA provider here (onnxruntime CPU build); "
                               "use --device cpu or --engine torch")
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = max(int(threads), 0)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise RuntimeError(f"{path}: cannot load the ONNX model ({str(exc).splitlines()[0]})") from exc


def run_session(session: Any, images: np.ndarray,
                 batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """uint8 (N, S, S) -> (probs (N, C), member_probs (N, K, C), member_features (N, K, D) or None) from ONNX
    Runtime; files exported before the features output have no third output."""
    names = [n for n in OUTPUT_NAMES if n in {o.name for o in session.get_outputs()}]

    def score(batch: np.ndarray) -> list[np.ndarray]:
        return list(session.run(names, {INPUT_NAME: batch[:, None].astype(np.float32)}))

    arrays = run_batches(images, batch_size, score)
    if not arrays:
        raise ValueError("run_session needs at least one image")
    return arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None


def parity_check(predictor: Predictor, onnx_path: str | Path, images: np.ndarray | None = None,
                 tolerance: float = PARITY_TOLERANCE) -> float:
    """Max |difference| of probabilities and member probabilities, ONNX Runtime vs PyTorch; raises above it."""
    if images is None:
        images = parity_images(int(predictor.meta["input"]["size"]))
    ref = predictor.predict_images(images)
    probs, member, _ = run_session(open_session(onnx_path), images)
    diff = float(max(np.abs(probs - ref.probs).max(), np.abs(member - ref.member_probs).max()))
    if not diff <= tolerance:  # also catches NaN
        raise ParityError(f"ONNX parity check failed: max |probability difference| {diff:.3g} > {tolerance:g} "
                          f"between ONNX Runtime and PyTorch on {len(images)} images")
    return diff


def ensure_onnx(run_dir: str | Path) -> Path:
    """RUN/model.onnx, exported (with the parity check) on first use or when the bundle changed since."""
    run_dir = Path(run_dir)
    path = run_dir / ONNX_NAME
    fingerprint = bundle_fingerprint(run_dir)
    if path.is_file():
        found = open_session(path).get_modelmeta().custom_metadata_map.get(_FINGERPRINT_KEY)
        if found == fingerprint:
            return path
        log.info("%s is stale (the bundle changed since it was exported); exporting again", path)
    else:
        log.info("exporting %s for the onnx engine (first use)", path)
    if not os.access(run_dir, os.W_OK):
        raise RuntimeError(f"{run_dir} is not writable: run `lungxray export {run_dir} --out FILE` elsewhere, "
                           f"or use --engine torch")
    return export_onnx(run_dir, path)


@dataclass
class OnnxPredictor(Predictor):
    """`Predictor` whose scores come from ONNX Runtime running RUN/model.onnx; everything else is shared.

    `member_logits` returns log member probabilities (logits up to a per-member constant, which every softmax
    downstream ignores), so `make_predictions` computes uncertainty, disagreement and referral unchanged.
    """

    session: Any = None

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu", *, onnx_path: str | Path | None = None,
             threads: int = ONNX_THREADS) -> OnnxPredictor:
        """The bundle at `run_dir` run by ONNX Runtime from RUN/model.onnx, or from `onnx_path` (an exported or
        int8 file of this very bundle: one exported before the bundle changed is refused)."""
        if onnx_path is None:
            path = ensure_onnx(run_dir)
        else:
            path = Path(onnx_path)
            found = open_session(path).get_modelmeta().custom_metadata_map.get(_FINGERPRINT_KEY)
            if found != bundle_fingerprint(run_dir):
                raise RuntimeError(f"{path} was not exported from {run_dir} as it is now; export it again")
        return cls(load_bundle(run_dir, "cpu"), torch.device("cpu"), session=open_session(path, device, threads))

    def member_logits(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        return self.member_outputs(images, batch_size)[0]

    def member_outputs(self, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        k = self.bundle.members
        if len(images) == 0:
            return np.zeros((0, k, len(self.classes)), np.float64), np.zeros((0, k, 0), np.float32)
        _, member, features = run_session(self.session, images, batch_size)
        if features is None:
            features = np.full((len(images), k, 0), np.nan, np.float32)
        return np.log(np.maximum(member.astype(np.float64), 1e-300)), features
