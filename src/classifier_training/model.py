"""Model creation: any timm architecture, pretrained from a local file or the hub.

Order of preference for pretrained weights:
1. ``model.pretrained_file`` (.safetensors/.pth/.bin): loaded by timm through
   ``pretrained_cfg_overlay={"file": ...}``, which adapts the classifier head (re-initialised when
   the class count differs) and the input channels; no network access.
2. The Hugging Face hub (timm's own download), when the machine is online.
3. Neither: fail within seconds with instructions, unless ``model.allow_random_init``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import timm
import torch

from classifier_training.recipe import ModelConfig

log = logging.getLogger(__name__)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and could not be obtained."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def create_model(
    cfg: ModelConfig, num_classes: int, *, pretrained: bool | None = None
) -> torch.nn.Module:
    """Build ``cfg.arch`` with a ``num_classes`` head; ``pretrained`` overrides ``cfg.pretrained``.

    Raises PretrainedWeightsError (naming the file or the hub tag, and how to provide the
    weights) when pretrained weights are required but unavailable.
    """
    want_pretrained = cfg.pretrained if pretrained is None else pretrained
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_rate": cfg.drop_rate}
    if not want_pretrained:
        return timm.create_model(cfg.arch, pretrained=False, **kwargs)

    if cfg.pretrained_file:
        path = Path(cfg.pretrained_file).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(
                f"model.pretrained_file: {path} does not exist. Point it at a .safetensors or "
                ".pth file of the backbone (any head), or set model.pretrained=false."
            )
        try:
            return timm.create_model(
                cfg.arch,
                pretrained=True,
                pretrained_cfg_overlay={"file": str(path.resolve())},
                **kwargs,
            )
        except (RuntimeError, KeyError, ValueError) as err:
            raise PretrainedWeightsError(
                f"model.pretrained_file: {path} does not fit {cfg.arch}: {err}"
            ) from err

    try:
        return timm.create_model(cfg.arch, pretrained=True, **kwargs)
    except Exception as err:  # hub errors come in many types (network, cache, auth)
        hint = (
            f"Could not get pretrained weights for {cfg.arch!r} from the Hugging Face hub "
            f"({type(err).__name__}). On a machine with internet run\n"
            f'  python -c "import timm, safetensors.torch as st; '
            f"m = timm.create_model('{cfg.arch}', pretrained=True); "
            f"st.save_file(m.state_dict(), '{cfg.arch}.safetensors')\"\n"
            f"copy the file here and set --model.pretrained_file {cfg.arch}.safetensors; "
            "or set --model.allow_random_init true to train from scratch"
        )
        if _hub_offline():
            hint += " (HF_HUB_OFFLINE is set, so the hub was not asked)"
        if cfg.allow_random_init:
            log.warning("%s. Continuing from random initialisation (allow_random_init).", hint)
            return timm.create_model(cfg.arch, pretrained=False, **kwargs)
        raise PretrainedWeightsError(hint) from err
