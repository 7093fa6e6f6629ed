"""``python -m pretrain.export CKPT_DIR OUT.safetensors [--tag global_stepN]``: consolidated fp32 weights.

Reads a pretraining checkpoint at any ZeRO stage (0-3, with or without offload), gathers the full fp32
weights (DeepSpeed's ``zero_to_fp32`` consolidation for ZeRO, the module states for stage 0), adds the
momentum encoders and queues from the task state, and writes one ``safetensors`` file whose keys follow
the released ALBEF layout (``visual_encoder.*``, ``text_encoder.bert.*``, ``text_encoder.cls.*``,
projections, ``itm_head``, ``temp``, and, when the run had them, ``*_m.*``, ``image_queue``, ``text_queue``,
``queue_ptr``); heads that other objectives added keep their names (``objectives.<name>.*``). Any method's
checkpoint exports this way. The resolved experiment config is written beside it as ``OUT.yaml`` and
embedded in the file's metadata, with the method that produced it.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from pretrain.checkpoint import read_latest
from pretrain.safe_loading import UnsafeCheckpointError, load_file, restricted_unpickling
from pretrain.task import upgrade_task_state

MODEL_PREFIX = "model."


def _module_state_from_stage0(tag_dir: str, trusted: bool) -> dict:
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    states = load_file(path, trusted=trusted)
    return {name: tensor.float() if tensor.is_floating_point() else tensor
            for name, tensor in states["module"].items()}


def consolidated_module_state(directory: str, tag: str, trusted: bool = False) -> dict:
    """Full fp32 state dict of the engine's module (the task), whatever the ZeRO stage; every file goes
    through the restricted unpickler unless ``trusted``."""
    tag_dir = os.path.join(directory, tag)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"checkpoint {tag_dir} does not exist")
    if glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with restricted_unpickling(trusted=trusted, where=tag_dir):
            state = get_fp32_state_dict_from_zero_checkpoint(directory, tag=tag)
        # zero_to_fp32 skips buffers; take them (e.g. position ids) from the model-states file.
        model_files = sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt")))
        model_states = load_file(model_files[0], trusted=trusted)
        module = model_states.get("module") or {}
        for name in model_states.get("buffer_names", []):
            if name in module and name not in state:
                state[name] = module[name]
        return state
    return _module_state_from_stage0(tag_dir, trusted)


def read_task_state(directory: str, tag: str, trusted: bool = False) -> dict:
    """The task's extra state in today's layout (method, objectives, momentum copies, objectives' state);
    empty parts when the checkpoint has no task_state.pt."""
    path = os.path.join(directory, tag, "task_state.pt")
    if not os.path.exists(path):
        return {"momentum": {}, "objective_state": {}}
    return upgrade_task_state(load_file(path, trusted=trusted))


def albef_state_dict(directory: str, tag: str, trusted: bool = False) -> dict:
    """Weights in ALBEF's layout, from a checkpoint of any method: the backbone (``visual_encoder.*``, ...),
    the momentum copies (``*_m.*``) and ITC's queues when the run had them, and any objective's own heads
    under ``objectives.<name>.*``."""
    module_state = consolidated_module_state(directory, tag, trusted)
    state = {name[len(MODEL_PREFIX):] if name.startswith(MODEL_PREFIX) else name: tensor
             for name, tensor in module_state.items()}
    if "temp" in state:
        state["temp"] = state["temp"].reshape(())  # ALBEF's files hold a 0-d temperature
    task_state = read_task_state(directory, tag, trusted)
    state.update(task_state.get("momentum") or {})
    queues = task_state["objective_state"].get("itc") or {}
    if queues:
        image_queue, text_queue = queues["image_queue"], queues["text_queue"]
        state["image_queue"] = image_queue["features"]
        state["text_queue"] = text_queue["features"]
        state["queue_ptr"] = torch.as_tensor(image_queue["ptr"]).reshape(1).long()
    # safetensors refuses shared storage (the tied MLM decoder); every tensor gets its own copy.
    return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}


def export(checkpoint: str, output: str, tag: str | None = None, trusted: bool = False) -> str:
    directory = os.path.normpath(checkpoint)
    if tag is None and os.path.basename(directory).startswith("global_step"):
        directory, tag = os.path.dirname(directory), os.path.basename(directory)
    tag = tag or read_latest(directory)
    if tag is None:
        raise FileNotFoundError(f"{checkpoint}: no 'latest' file; pass --tag or a global_stepN directory")
    state = albef_state_dict(directory, tag, trusted)
    method = read_task_state(directory, tag, trusted).get("method", "")
    config_path = os.path.join(directory, tag, "config.yaml")
    config_text = Path(config_path).read_text() if os.path.exists(config_path) else ""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    save_file(state, output, metadata={"format": "pt", "source": os.path.join(directory, tag), "method": method,
                                       "config": config_text})
    with open(os.path.splitext(output)[0] + ".yaml", "w") as handle:
        handle.write(config_text)
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoints directory (with 'latest') or DIR/global_stepN")
    parser.add_argument("output", help="output .safetensors file")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="open its files with the full unpickler (only for files whose origin you trust)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        tag = export(args.checkpoint, args.output, args.tag, trusted=args.trust_checkpoint)
    except (FileNotFoundError, UnsafeCheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} from {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
