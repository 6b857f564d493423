"""State dicts as other projects save them: where the tensors sit in a checkpoint file, DataParallel's
"module." prefix, the KD references' layer names, and which layers do not fit a model.

The teachers mdistiller and RepDistiller publish (`ckpt_epoch_240.pth`) hold `{"model": state dict,
"epoch": ..., "optimizer": ...}`; torchdistill's checkpoints keep the state dict under "model" too,
others under "net" or "model_state_dict", this project's under "state_dict". Their ResNets use the
zoo's layer names; their WRNs and VGGs name the same layers differently (`block1.layer.0.bn1` for
`block1.0.bn1`, `block0.0` for `features.0`), so a file whose names differ but whose tensors have the
model's shapes in the model's order is read by position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

STATE_DICT_KEYS = ("state_dict", "model", "net", "model_state_dict")  # where checkpoint files keep their weights
COUNTER = "num_batches_tracked"  # batch norm's step counter: not a weight (files from PyTorch 0.4.0 lack it)


def unpack(content: Any) -> tuple[Any, dict[str, Any]]:
    """The state dict in a loaded file (the file itself, or its entry under one of STATE_DICT_KEYS), its keys
    without DataParallel's "module." prefix, and the file's other entries ({} for a plain state dict)."""
    extra: dict[str, Any] = {}
    if isinstance(content, dict):
        key = next((key for key in STATE_DICT_KEYS if isinstance(content.get(key), dict)), None)
        if key is not None:
            content, extra = dict(content[key]), content
        consume_prefix_in_state_dict_if_present(content, "module.")
    return content, extra


def is_counter(name: str) -> bool:
    """Whether a state-dict entry is batch norm's step counter rather than a weight."""
    return name.rpartition(".")[2] == COUNTER


def _weights(state_dict: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in state_dict if not is_counter(name)]


def align(own: dict[str, torch.Tensor], offered: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`offered` under the model's names: as it is when the names agree; by position when they differ but the
    tensors are as many (counting batch norm's counters, or leaving them out on both sides when the file has
    none), with the model's shapes in its order, the classifier's (the last two) aside, since they change with
    the class count."""
    if set(_weights(own)) <= set(offered):
        return offered
    own_names, offered_names = list(own), list(offered)
    if len(own_names) != len(offered_names):
        own_names, offered_names = _weights(own), _weights(offered)
    if len(own_names) != len(offered_names):
        return offered
    pairs = list(zip(own_names, offered_names, strict=True))
    if any(own[mine].shape != offered[theirs].shape for mine, theirs in pairs[:-2]):
        return offered
    return {mine: offered[theirs] for mine, theirs in pairs}


def mismatches(own: dict[str, torch.Tensor], offered: dict[str, torch.Tensor]) -> list[str]:
    """Every weight of the model that `offered` (aligned) does not give with its shape, and every weight of
    `offered` the model has no place for, one phrase each ("fc.weight: (100, 64) in the file, (10, 64) in the
    model"); batch norm's counters aside."""
    found = []
    for name in _weights(own):
        if name not in offered:
            found.append(f"{name}: not in the file")
        elif offered[name].shape != own[name].shape:
            found.append(f"{name}: {tuple(offered[name].shape)} in the file, {tuple(own[name].shape)} in the model")
    return found + [f"{name}: not in the model" for name in _weights(offered) if name not in own]
