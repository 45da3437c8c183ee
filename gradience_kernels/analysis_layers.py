"""The weight matrices that ``analysis.analyze`` reads, WeightWatcher 0.7.7's way (see the
analysis module docstring): a saved state_dict file, the layers of an nn.Module or a state_dict
with their kind, their N x M x rf dimensions and the filters that skip them, and the tall
matrices of a layer."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a saved state_dict: .pt/.pth/.bin/.ckpt (``torch.load(weights_only=True)``, on CPU)
    or .safetensors (needs the ``safetensors`` package). Errors name the path."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    if p.is_dir():
        raise IsADirectoryError(f"expected a state_dict file (.pt, .pth, .bin, .ckpt or "
                                f".safetensors), got a directory: {str(path)!r}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(f"reading {str(path)!r} needs the safetensors package (pip "
                              f"install safetensors), which is not importable: {err}") from None
        try:
            return dict(load_file(str(p), device="cpu"))
        except Exception as err:  # noqa: BLE001 - any reader failure is a bad file
            raise ValueError(f"could not read {str(path)!r} as a safetensors file: "
                             f"{type(err).__name__}: {err}") from None
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(f"could not read {str(path)!r} with torch.load(weights_only=True): "
                             f"{type(err).__name__}: {first}") from None
        if not isinstance(obj, Mapping):
            raise TypeError(f"{str(path)!r} holds a {type(obj).__name__}, expected a state_dict "
                            f"(a dict of name -> tensor)")
        return dict(obj)
    raise ValueError(f"unsupported file type {p.suffix!r} for {str(path)!r}: expected .pt, .pth, "
                     f".bin, .ckpt or .safetensors")


# --------------------------------------------------------------------------- layers
@dataclass
class _Layer:
    name: str
    kind: str                 # linear | embedding | conv1d | conv2d | dense (state_dict 2-D)
    weight: torch.Tensor
    N: int = 0
    M: int = 0
    rf: int = 1
    scale: float = 1.0        # eigenvalue factor (1/2 for Conv2d under conv2d_norm)
    skip: str | None = None
    evals: torch.Tensor | None = None   # float64 ascending, all rf*M values (scaled)
    per_matrix: torch.Tensor | None = None  # (rf, M) float64 ascending per matrix (scaled)
    route: str = ""
    fit: dict = field(default_factory=dict)


def _module_kind(module: torch.nn.Module) -> str | None:
    # WeightWatcher's PyTorchLayer.layer_type: substring tests on the lower-cased type string.
    typestr = str(type(module)).lower()
    if "linear" in typestr:
        return "linear"
    if "conv1d" in typestr:
        return "conv1d"
    if "conv2d" in typestr:
        return "conv2d"
    if "embedding" in typestr:
        return "embedding"
    return None  # 'norm' types and everything else: no weight matrix


_NDIM = {"linear": 2, "embedding": 2, "dense": 2, "conv1d": 3, "conv2d": 4}


def _from_module(model: torch.nn.Module) -> list[_Layer]:
    layers = []
    for name, module in model.named_modules():
        kind = _module_kind(module)
        if kind is None:
            continue
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        layers.append(_Layer(name or type(module).__name__, kind, w.detach()))
    return layers


def _from_state_dict(sd: Mapping[str, Any], what: str) -> list[_Layer]:
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    for key, value in sd.items():
        if not isinstance(key, str):
            raise TypeError(f"{what}: state_dict keys must be strings, got key {key!r} "
                            f"({type(key).__name__})")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: state_dict[{key!r}] is a {type(value).__name__}, expected "
                            f"a tensor")
    layers = []
    for key, value in sd.items():
        if not key.endswith(".weight"):
            continue
        if value.dim() == 2:
            kind = "dense"
        elif value.dim() == 4:
            kind = "conv2d"
        else:
            continue  # WeightWatcher: LAYER_TYPE.UNKNOWN (biases, norms, 1-D/3-D tensors)
        if value.shape[0] < 2:
            continue  # PyStateDictLayer.layer_type: len(weights) < 2 is UNKNOWN
        layers.append(_Layer(key[: -len(".weight")], kind, value.detach()))
    return layers


def _dims(layer: _Layer, conv2d_norm: bool) -> None:
    w = layer.weight
    if w.dim() != _NDIM[layer.kind]:
        layer.skip = f"{layer.kind} weight of shape {tuple(w.shape)} is not {_NDIM[layer.kind]}-D"
        return
    if w.is_complex() or not w.dtype.is_floating_point:
        layer.skip = f"dtype {w.dtype} is not a real floating-point type"
        return
    if w.numel() == 0:
        layer.skip = "empty weight"
        return
    out_c, in_c = int(w.shape[0]), int(w.shape[1])
    layer.N, layer.M = max(out_c, in_c), min(out_c, in_c)
    layer.rf = int(math.prod(w.shape[2:])) if w.dim() > 2 else 1
    layer.scale = 0.5 if (layer.kind == "conv2d" and conv2d_norm) else 1.0


def _filter(layer: _Layer, min_evals: int, max_evals: int, max_N: int) -> None:
    n_evals = layer.M * layer.rf
    if min_evals and n_evals < min_evals:
        layer.skip = f"{n_evals} eigenvalues < min_evals={min_evals}"
    elif max_evals and n_evals > max_evals:
        layer.skip = f"{n_evals} eigenvalues > max_evals={max_evals}"
    elif layer.N > max_N:
        layer.skip = f"N={layer.N} > max_N={max_N}"


def _matrices(layer: _Layer) -> list[torch.Tensor]:
    """The layer's matrices, each oriented tall (rows >= cols)."""
    w = layer.weight
    if w.dim() == 2:
        mats = [w]
    else:
        flat = w.reshape(w.shape[0], w.shape[1], -1)
        mats = [flat[:, :, i] for i in range(flat.shape[2])]
    return [m if m.shape[0] >= m.shape[1] else m.mT for m in mats]


def _storage_key(w: torch.Tensor) -> tuple:
    try:
        ptr = w.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
        return (id(w),)
    return (ptr, w.storage_offset(), tuple(w.shape), tuple(w.stride()), w.dtype, str(w.device))
