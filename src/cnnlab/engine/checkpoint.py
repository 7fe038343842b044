"""Weights as safetensors (no pickle) and resumable checkpoints loadable with torch.load(weights_only=True)."""

from __future__ import annotations

import io
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from cnnlab.errors import CnnlabError, UsageError
from cnnlab.fileio import atomic_write_bytes

CHECKPOINT_FORMAT = "cnnlab-checkpoint-v1"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel or torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save the model's state_dict as safetensors, atomically."""
    # clone(): safetensors refuses tensors that share storage (e.g. tied weights or views).
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in unwrap(model).state_dict().items()}
    return atomic_write_bytes(path, safetensors.torch.save(state))


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors file into CPU tensors; malformed files are refused with a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such weights file")
    try:
        return safetensors.torch.load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CnnlabError(f"{path}: not a valid safetensors file ({_first_line(e)})") from e


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load safetensors weights into `model`, naming the first tensor that is missing or does not fit."""
    apply_state_dict(unwrap(model), read_weights(path), source=str(path))
    return model


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with an error that names the first mismatching tensor."""
    if not isinstance(state, dict):
        raise CnnlabError(f"{source}: not a state dict of tensors (a {type(state).__name__})")
    own = model.state_dict()
    # Walk in the model's own order (file order depends on the reader) so "the first mismatch" is deterministic.
    for key, expected in own.items():
        if key not in state:
            missing = [k for k in own if k not in state]
            raise CnnlabError(f"{source}: tensor {key!r} is missing ({len(missing)} missing in all)")
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise CnnlabError(f"{source}: entry {key!r} is a {type(got).__name__}, not a tensor")
        if got.shape != expected.shape:
            raise CnnlabError(
                f"{source}: tensor {key!r} has shape {tuple(got.shape)}, the model expects {tuple(expected.shape)}"
            )
        # load_state_dict would cast int8 into float weights silently (a model that predicts one class everywhere).
        if expected.is_floating_point() and not got.is_floating_point():
            raise CnnlabError(
                f"{source}: tensor {key!r} has dtype {str(got.dtype).replace('torch.', '')}, "
                f"the model expects {str(expected.dtype).replace('torch.', '')}"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise CnnlabError(f"{source}: tensor {key!r} holds NaN or infinite values")
    extra = [k for k in state if k not in own]
    if extra:
        raise CnnlabError(f"{source}: tensor {extra[0]!r} does not belong to this model")
    model.load_state_dict(state, strict=True)


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random state a training run depends on, as tensors and plain values (no pickled objects)."""
    _kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what rng_state() captured."""
    random.setstate((3, tuple(int(v) for v in state["python"]), None))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for key, g in (generators or {}).items():
        g.set_state(state["generators"][key])


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Serialise a checkpoint dict (tensors, numbers, strings, lists, dicts only) atomically."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with torch.load(weights_only=True): a pickled payload is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CnnlabError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain data ({_first_line(e)})"
        ) from e
    except Exception as e:  # garbage bytes make torch's unpickler raise anything (IndexError, KeyError, ...)
        raise CnnlabError(f"{path}: not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CnnlabError(f"{path}: not a cnnlab checkpoint")
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
