"""Student -> open_clip ``local-dir:`` folder, loadable by open_clip and clip_benchmark with no project code:

    OUT/open_clip_config.json          {"model_cfg": ..., "preprocess_cfg": {mean, std, interpolation, resize_mode}}
    OUT/open_clip_model.safetensors    open_clip state-dict keys, fp32

    open_clip.create_model_and_transforms("local-dir:OUT"); open_clip.get_tokenizer("local-dir:OUT")

From a DeepSpeed checkpoint directory (``engine.save_checkpoint(DIR)``, any ZeRO stage, no launcher):

    python -m cid_ds.export --checkpoint runs/x/checkpoints --model demo-student --out runs/x/export
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
import warnings
from typing import Optional

import open_clip
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
from torch import nn

from cid_ds.io import check_writable, write_json
from cid_ds.models import create_model, model_config, resolve_spec
from cid_ds.safe_load import checkpoint_files, deepspeed_classes, load_weights, refuse_code

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# what open_clip's own hub export writes; the image size comes from model_cfg
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")
STUDENT_PREFIX = "clip."  # DistillStudent's open_clip submodule


def export_open_clip(clip_model: nn.Module, model_spec: str, out_dir: str) -> str:
    """Write ``clip_model`` (an open_clip model of architecture ``model_spec``) as a ``local-dir:`` folder.

    The folder is written under a temporary name beside ``out_dir``, loaded back with open_clip (strict),
    and only then renamed into place; a previous export there is replaced, any other folder is refused.
    Returns the absolute path of the folder.
    """
    out_dir = os.path.abspath(out_dir)
    _check_replaceable(out_dir)
    model_cfg = model_config(model_spec)
    hf_tokenizer = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    if hf_tokenizer:
        raise ValueError(f"model '{model_spec}' uses the Hugging Face tokenizer '{hf_tokenizer}', whose files a "
                         f"local-dir: folder must hold; export supports open_clip's built-in tokenizer only")
    preprocess_cfg = getattr(clip_model.visual, "preprocess_cfg", None)
    if not preprocess_cfg:
        raise ValueError("the model has no visual.preprocess_cfg: build it with open_clip's factory "
                         "(cid_ds.models.create_model) so that its preprocessing can be exported")
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {k: preprocess_cfg[k] for k in PREPROCESS_KEYS if k in preprocess_cfg}}
    # copy=True: tied or shared tensors would be refused by safetensors
    tensors = {name: t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True)
               .contiguous() for name, t in clip_model.state_dict().items()}

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME))
        write_json(os.path.join(tmp, CONFIG_NAME), config)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp and safetensors make private files; an export is shared
        os.chmod(os.path.join(tmp, WEIGHTS_NAME), 0o666 & ~umask)
        try:
            open_clip.create_model(f"local-dir:{tmp}")  # loads the weights strictly
        except Exception as e:
            raise ValueError(f"the export of model '{model_spec}' does not load back in open_clip: {e}") from e
        _replace_dir(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return out_dir


def _check_replaceable(out_dir: str) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ValueError(f"{out_dir}: exists and is not a folder")
        foreign = sorted(set(os.listdir(out_dir)) - {CONFIG_NAME, WEIGHTS_NAME})
        if foreign:
            raise ValueError(f"{out_dir}: exists and holds more than an export ({', '.join(foreign[:5])}); "
                             "refusing to replace it")


def _replace_dir(new: str, out_dir: str) -> None:
    """Rename ``new`` to ``out_dir``; an old folder is moved aside first and removed last, so a crash
    in between leaves it intact beside ``out_dir``."""
    if not os.path.exists(out_dir):
        os.replace(new, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old", dir=os.path.dirname(out_dir))
    os.replace(out_dir, os.path.join(old, "export"))
    os.replace(new, out_dir)
    shutil.rmtree(old)


def latest_tag(checkpoint_dir: str) -> str:
    latest = os.path.join(checkpoint_dir, "latest")
    if not os.path.isfile(latest):
        raise ValueError(f"{latest}: file missing (not a DeepSpeed checkpoint directory? pass --tag)")
    with open(latest) as f:
        return f.read().strip()


def consolidated_state_dict(checkpoint_dir: str, tag: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the engine's module in a DeepSpeed checkpoint, on CPU.

    ZeRO 1-3: the fp32 master weights, gathered from every rank's partition by DeepSpeed's zero_to_fp32.
    No ZeRO (stage 0): the module weights saved by rank 0, the only copy saved with names.
    """
    if not os.path.isdir(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir}: no such checkpoint directory")
    tag = tag or latest_tag(checkpoint_dir)
    tag_dir = os.path.join(checkpoint_dir, tag)
    if not os.path.isdir(tag_dir):
        raise ValueError(f"{tag_dir}: no such checkpoint (tag '{tag}'; tags here: "
                         f"{sorted(d for d in os.listdir(checkpoint_dir) if os.path.isdir(os.path.join(checkpoint_dir, d)))})")
    if not glob.glob(os.path.join(tag_dir, "*model_states.pt")):
        raise ValueError(f"{tag_dir}: no *model_states.pt file (not a DeepSpeed checkpoint)")
    refuse_code(checkpoint_files(tag_dir), deepspeed_classes())  # zero_to_fp32 unpickles them with weights_only=False
    rank0_states = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if os.path.isfile(rank0_states):
        states = load_weights(rank0_states, allowed=deepspeed_classes())
        if states.get("param_shapes") is None:  # ZeRO off: zero_to_fp32 has nothing to reassemble
            module = states["module"]
            low_precision = sorted({str(t.dtype) for t in module.values() if t.is_floating_point()} - {"torch.float32"})
            if low_precision:
                warnings.warn(f"{rank0_states}: no ZeRO, so the exported weights are the {low_precision} copies "
                              "the module was trained with (the fp32 master copy is not saved with names)")
            return {k: t.float() if t.is_floating_point() else t for k, t in module.items()}
    return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)


def student_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The open_clip part of a DistillStudent state dict, with its own keys (``clip.`` stripped)."""
    clip_state = {k[len(STUDENT_PREFIX):]: t for k, t in state.items() if k.startswith(STUDENT_PREFIX)}
    if not clip_state:
        raise ValueError(f"{source}: no '{STUDENT_PREFIX}*' weights (not a cid_ds DistillStudent checkpoint?); "
                         f"first keys: {sorted(state)[:5]}")
    return clip_state


def pretrained_preprocess_cfg(model_spec: str, pretrained: Optional[str]) -> dict:
    """The preprocessing that open_clip pairs with a pretrained tag (none for no tag or a weights file)."""
    if pretrained is None or os.path.isfile(pretrained):
        return {}
    tag_cfg = open_clip.get_pretrained_cfg(resolve_spec(model_spec), pretrained)
    if not tag_cfg:
        raise ValueError(f"'{pretrained}' is not a pretrained tag of model '{model_spec}'")
    return {k: tag_cfg[k] for k in PREPROCESS_KEYS if k in tag_cfg}


def export_checkpoint(checkpoint_dir: str, model_spec: str, out_dir: str, tag: Optional[str] = None,
                      pretrained: Optional[str] = None) -> str:
    """Export the student of a DeepSpeed checkpoint as a ``local-dir:`` folder; returns its path.

    ``model_spec`` is the student's architecture as trained; ``pretrained`` is the tag it started from, if
    any: only its preprocessing (mean/std) is kept, its weights are neither loaded nor downloaded.
    """
    tag_preprocess_cfg = pretrained_preprocess_cfg(model_spec, pretrained)
    clip_state = student_state_dict(consolidated_state_dict(checkpoint_dir, tag), checkpoint_dir)
    clip_model = create_model(model_spec)[0]
    for name, target in clip_model.state_dict().items():
        # a 0-dim parameter (logit_scale) may be trained as shape [1]: DeepSpeed cannot broadcast 0-dim ones
        if name in clip_state and target.ndim == 0 and clip_state[name].numel() == 1:
            clip_state[name] = clip_state[name].reshape(())
    try:
        clip_model.load_state_dict(clip_state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{checkpoint_dir}: the student weights do not fit model '{model_spec}': {e}") from None
    clip_model.visual.preprocess_cfg.update(tag_preprocess_cfg)
    return export_open_clip(clip_model, model_spec, out_dir)


def main(argv: Optional[list[str]] = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m cid_ds.export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="DeepSpeed checkpoint directory (holds 'latest')")
    parser.add_argument("--model", required=True, help="the student's model spec, as trained")
    parser.add_argument("--pretrained", default=None, help="the student's starting pretrained tag, if any")
    parser.add_argument("--out", required=True, help="the local-dir: folder to write")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one in 'latest')")
    args = parser.parse_args(argv)
    try:
        check_writable(os.path.dirname(os.path.abspath(args.out)))  # the export is written beside --out, then renamed
        out = export_checkpoint(args.checkpoint, args.model, args.out, tag=args.tag, pretrained=args.pretrained)
    except ValueError as e:
        raise SystemExit(f"export: {e}") from None
    print(f"exported to {out}  (load with open_clip.create_model_and_transforms('local-dir:{out}'))")
    return out


if __name__ == "__main__":
    main()
