"""Opening checkpoint files without running their code: ``torch.load(weights_only=True)`` plus an allowlist.

A ``.pt`` file is a pickle, and a pickle may name any Python callable to run while it is read, so a
checkpoint folder someone shares could run arbitrary code on the machine that opens it. Every file this
project opens (our own client state and task state, DeepSpeed's model and optimizer states at any ZeRO
stage, universal checkpoints, released ``.pth`` weights) is read with PyTorch's restricted unpickler,
which builds only tensors, containers and plain values, plus the few types listed in
``allowed_globals()``: what DeepSpeed's own files and our RNG states hold (found by loading checkpoints of
every ds_config; ``tests/pretrain/test_safe_loading.py`` keeps that true).

DeepSpeed calls ``torch.load(..., weights_only=False)`` itself, so its loads run inside
``restricted_unpickling()``, which sets PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch for their
duration::

    with restricted_unpickling(trusted=False, where=tag_dir):
        engine.load_checkpoint(directory, tag)     # a blocked file raises UnsafeCheckpointError naming it
    state = load_file(path)                        # our own files

``trusted=True`` (the ``--trust-checkpoint`` option of pretrain, finetune and export) opens files with the
full unpickler: only for files whose origin the user vouches for.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
import re
import runpy
import sys
import zipfile
from collections.abc import Iterator

import torch

FORCE_VARIABLE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
TRUST_HINT = ("if you trust where it came from, re-run with --trust-checkpoint (which opens it with Python's full "
              "unpickler); otherwise ask its author for a safetensors export")


class UnsafeCheckpointError(ValueError):
    """A file that needs more than the allowlist to open, or is no checkpoint at all; the message names it."""


def allowed_globals() -> list:
    """The types beyond tensors and plain values that our and DeepSpeed's checkpoint files may hold."""
    import numpy
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = numpy._core.multiarray._reconstruct
    return [
        # numpy's RNG state in our per-rank client state: a uint32 array (numpy 1.x named the module
        # numpy.core, numpy 2 numpy._core; a checkpoint holds whichever wrote it).
        (reconstruct, "numpy._core.multiarray._reconstruct"), (reconstruct, "numpy.core.multiarray._reconstruct"),
        numpy.ndarray, numpy.dtype, type(numpy.dtype(numpy.uint32)),
        # DeepSpeed's ZeRO optimizer states: the loss scaler (static; dynamic under fp16), the stage, and
        # where each parameter's fragment lies in the flat partition.
        LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,
    ]


def _blocked_global(error: BaseException) -> str | None:
    match = re.search(r"GLOBAL ([\w.]+)", str(error)) or re.search(r"but got <class '([\w.]+)'>", str(error))
    return match.group(1) if match else None


def _refusal(path: str, error: BaseException) -> UnsafeCheckpointError:
    blocked = _blocked_global(error)
    what = f"the Python object {blocked}" if blocked else "Python objects"
    return UnsafeCheckpointError(f"refusing to open {path}: it holds {what}, which a checkpoint of this project "
                                 f"never needs and which could run code when unpickled; {TRUST_HINT}")


def load_file(path: str, *, trusted: bool = False, map_location: str | torch.device = "cpu"):
    """``torch.load`` of one file with the allowlist (or fully, when ``trusted``); errors name the file."""
    try:
        if trusted:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if _blocked_global(error):
            raise _refusal(path, error) from None
        raise _not_a_checkpoint(path, error) from None
    except (KeyError, EOFError, zipfile.BadZipFile) as error:
        raise _not_a_checkpoint(path, error) from None
    except RuntimeError as error:  # "PytorchStreamReader failed reading zip archive": a damaged file
        if "PytorchStreamReader" not in str(error):
            raise
        raise _not_a_checkpoint(path, error) from None


def _not_a_checkpoint(path: str, error: BaseException) -> UnsafeCheckpointError:
    # torch.load reports a file of another kind as KeyError: 101 (a legacy magic number), EOFError, or an
    # unpickling error deep in its own words; the last line of that is enough.
    detail = str(error).strip().splitlines()
    detail = next((line for line in detail if "Unsupported operand" in line), detail[0] if detail else "")
    return UnsafeCheckpointError(f"{path} is not a PyTorch checkpoint file, or it is damaged ({type(error).__name__}: "
                                 f"{detail}); give a .pt/.pth written by torch.save, or a .safetensors file")


def checkpoint_files(directory: str) -> list[str]:
    """Every pickle file of a DeepSpeed tag directory, universal sub-folders included, sorted."""
    return sorted(glob.glob(os.path.join(directory, "**", "*.pt"), recursive=True))


def find_blocked_file(paths: list[str]) -> UnsafeCheckpointError | None:
    """The refusal for the first of ``paths`` the restricted unpickler will not open (or None)."""
    for path in paths:
        try:
            load_file(path)
        except UnsafeCheckpointError as error:
            return error
    return None


@contextlib.contextmanager
def restricted_unpickling(*, trusted: bool = False, where: str | None = None) -> Iterator[None]:
    """Every ``torch.load`` inside, DeepSpeed's included, runs with ``weights_only=True`` and the allowlist.

    A refused file surfaces as ``UnsafeCheckpointError`` naming it: PyTorch's own message does not say which
    file it was reading, so on failure the ``.pt`` files under ``where`` are checked one by one to find it.
    """
    if trusted:
        yield
        return
    previous = os.environ.get(FORCE_VARIABLE)
    os.environ[FORCE_VARIABLE] = "1"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    except pickle.UnpicklingError as error:
        culprit = find_blocked_file(checkpoint_files(where)) if where else None
        raise culprit or _refusal(where or "a checkpoint file", error) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_VARIABLE, None)
        else:
            os.environ[FORCE_VARIABLE] = previous


def main(argv: list[str]) -> None:
    """``python -m pretrain.safe_loading MODULE ARGS...``: run a module as ``__main__`` with restricted
    unpickling for the whole process (DeepSpeed's checkpoint converter; the worker processes it forks
    inherit the switch and the allowlist)."""
    if not argv:
        raise SystemExit("usage: python -m pretrain.safe_loading MODULE [ARGS...]")
    os.environ[FORCE_VARIABLE] = "1"
    torch.serialization.add_safe_globals(allowed_globals())
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
