"""The epoch-hook interface: small observers called at fit start, each epoch end and fit end.

Hooks never run inside the step loop, and only on the main process:
:func:`~classifier_training.hooks.run_hooks` skips the others, which wait at its closing
all-reduce (that is also how a hook failure reaches every process). A hook's round is blocking
time, so anything heavy (drawing, writing big files) goes to ``ctx.background``
(:mod:`classifier_training.hooks.background`) and runs while the next epoch trains. A hook
reports numbers through ``ctx.log_metrics`` (the trackers, at the current step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from classifier_training.hooks.background import BackgroundWork

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from timm.utils.model_ema import ModelEmaV3

    from classifier_training.augment.pipeline import BatchAugment
    from classifier_training.data.index import DatasetIndex
    from classifier_training.data.loaders import Loaders
    from classifier_training.evaluation import EvalResult
    from classifier_training.recipe import Recipe


@dataclass
class FitContext:
    """Everything a hook may look at; the engine fills and updates it."""

    recipe: Recipe
    accelerator: Accelerator
    run_dir: Path
    index: DatasetIndex
    loaders: Loaders
    model: torch.nn.Module  # as prepared by Accelerate (may be DDP-wrapped)
    ema: ModelEmaV3 | None
    augment: BatchAugment
    class_names: list[str]  # index order
    epoch: int = -1  # 0-based epoch that just ended (on_epoch_end), else -1
    is_last_epoch: bool = False
    metrics: dict[str, float] = field(default_factory=dict)  # this epoch's metrics
    evals: dict[str, EvalResult] = field(
        default_factory=dict
    )  # "val", "val_raw", "val_ema", "test"
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    log_images: Callable[[dict[str, Path]], None] = lambda images: None  # to the trackers
    log_metrics: Callable[[dict[str, float]], None] = lambda values: None  # to the trackers
    background: BackgroundWork = field(default_factory=lambda: BackgroundWork("inline"))
    extra: dict[str, Any] = field(default_factory=dict)  # hooks may leave notes for others

    def unwrapped_model(self) -> torch.nn.Module:
        """The bare model (no DDP / compile wrapper)."""
        return self.accelerator.unwrap_model(self.model)  # type: ignore[no-any-return]

    def epoch_dir(self) -> Path:
        """``runs/<name>/epochs/<NNN>/`` for the current epoch (1-based in the name)."""
        path = self.run_dir / "epochs" / f"{self.epoch + 1:03d}"
        path.mkdir(parents=True, exist_ok=True)
        return path


class Hook:
    """Base class: override what you need. ``name`` is the recipe's ``hooks.enabled`` entry."""

    name = "hook"

    def on_fit_start(self, ctx: FitContext) -> None:
        """Before the first epoch (also after a resume)."""

    def on_epoch_end(self, ctx: FitContext) -> None:
        """After evaluation and checkpointing of ``ctx.epoch``."""

    def on_fit_end(self, ctx: FitContext) -> None:
        """After the last epoch (or early stop), with ``ctx.best_checkpoint`` final."""
