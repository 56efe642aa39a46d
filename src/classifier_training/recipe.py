"""Training recipes: nested dataclasses loaded from YAML and overridden by dotted CLI flags.

Precedence is ``dataclass defaults < YAML file(s) < command line``::

    accelerate launch src/train.py --recipe recipes/basketball_r18.yaml --optim.lr 3e-4

The YAML files are validated with file:line errors and decoded into a :class:`Recipe` by
:mod:`classifier_training.recipe_yaml` *before* simple-parsing sees them; that Recipe is the
default object simple-parsing parses the flags over (:func:`parse_recipe`), and
:func:`check_recipe` refuses values no type rules out. Variants (model, dataset,
augmentation preset) are plain fields, never simple-parsing subgroups (upstream #331/#358/#287),
and no field is an ``Optional[dataclass]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from simple_parsing import field as simple_field

from classifier_training.io import atomic_write_text
from classifier_training.recipe_checks import recipe_problems
from classifier_training.recipe_yaml import RecipeError, from_yaml

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"


def parse_label_weights(text: str) -> dict[str, float]:
    """``'8=0.5,00=3'`` or ``'{"8": 0.5}'`` -> {"8": 0.5, "00": 3.0} (the CLI form of a dict)."""
    text = text.strip()
    if text.startswith("{"):
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"not a JSON object: {err}") from err
        if not isinstance(data, dict):
            raise argparse.ArgumentTypeError("expected a JSON object {label: weight}")
        return {str(k): float(v) for k, v in data.items()}
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, sep, weight = item.rpartition("=")
        try:
            out[label] = float(weight) if sep else float("nan")
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r}: expected LABEL=WEIGHT, e.g. 8=0.5,00=3")
    return out


@dataclass
class SyntheticConfig:
    """The synthetic jersey dataset generated when ``data.generate_if_missing`` is set."""

    train_per_class: int = 60
    """Train images per class (the largest class under ``long_tail``)."""
    valid_per_class: int = 12
    """Validation images per class."""
    test_per_class: int = 12
    """Test images per class."""
    image_size: int = 64
    """Side of the square crops that are rendered, in pixels."""
    long_tail: bool = False
    """Mimic the real data's imbalance: train counts fall geometrically to ~1/60 of the largest."""
    seed: int = 0
    """Generator seed: same seed, same bytes."""
    labels: list[str] = field(default_factory=list)
    """Labels to render; empty means the 42 default jersey labels."""


@dataclass
class DataConfig:
    """Where the images are and how they are batched."""

    root: str = "data/synthetic-jerseys"
    """Dataset root holding the split folders (train/valid/test)."""
    format: Literal["auto", "jsonl", "imagefolder"] = "auto"
    """Layout: JSONL annotations, ImageFolder class folders, or auto-detect."""
    train_split: str = "train"
    """Name of the training split folder."""
    val_split: str = "valid"
    """Name of the validation split folder."""
    test_split: str = "test"
    """Name of the test split folder ("" to skip testing)."""
    image_size: int = 224
    """Network input side (square). Eval resizes the shorter side to size*256/224 then crops."""
    batch_size: int = 64
    """Per-process batch size (global batch = batch_size * processes * grad_accum_steps)."""
    eval_batch_size: int = 0
    """Per-process evaluation batch size (0: same as batch_size)."""
    num_workers: int = 4
    """DataLoader worker processes per training process."""
    pin_memory: bool = True
    """Pin host memory for faster host-to-GPU copies (ignored on CPU)."""
    cache: Literal["none", "ram", "disk", "auto"] = "auto"
    """Decoded-image cache: decode and resize each image once (ram: shared memory for this run;
    disk: kept in cache_dir for the next run; auto: ram if it fits in memory, else disk)."""
    cache_dir: str = ""
    """Folder of the disk cache (empty: $CLASSIFIER_TRAINING_CACHE or ~/.cache/classifier-training,
    then decoded/)."""
    train_fit: Literal["letterbox", "stretch"] = "letterbox"
    """How a loader worker brings a train image to image_size: letterbox keeps the aspect."""
    sampler: Literal["disabled", "auto", "manual"] = "disabled"
    """Weighted sampling of train rows: off, inverse class frequency, or sampler_weights."""
    sampler_weights: dict[str, float] = simple_field(
        default_factory=dict, type=parse_label_weights, metavar="LABEL=W,..."
    )
    """Per-class sampling weights by label name for sampler=manual (absent labels weigh 1);
    on the command line '8=0.5,00=3' or a JSON object."""
    skip_bad_images: bool = False
    """Train without the images that fail the full-decode check before epoch 1 (they are counted
    and listed in dataset_stats.json) instead of stopping with the list."""
    generate_if_missing: bool = False
    """Render the synthetic jersey dataset into root when root does not exist."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Settings of the generated dataset (used only with generate_if_missing)."""


@dataclass
class ModelConfig:
    """The timm backbone."""

    arch: str = "resnet18.tv_in1k"
    """Any timm model name, with its pretrained tag (resnet18.tv_in1k, resnet50.tv2_in1k, ...)."""
    pretrained: bool = True
    """Start from pretrained weights (pretrained_file if set, else the Hugging Face hub)."""
    pretrained_file: str = ""
    """Local .safetensors/.pth file with the backbone's pretrained weights (head may differ)."""
    allow_random_init: bool = False
    """When pretrained weights cannot be had, train from scratch instead of failing."""
    drop_rate: float = 0.0
    """Dropout before the classifier."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """Memory format: auto turns channels_last on for CUDA only."""


@dataclass
class OptimConfig:
    """Optimizer and gradient handling."""

    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = 5e-4
    """Peak learning rate (after warmup)."""
    weight_decay: float = 1e-4
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    momentum: float = 0.9
    """SGD momentum."""
    clip_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""


@dataclass
class ScheduleConfig:
    """Linear warmup then cosine decay, stepped per optimizer update (timm CosineLRScheduler)."""

    warmup_epochs: float = 5.0
    """Warmup length in epochs (converted to optimizer updates)."""
    warmup_lr_factor: float = 1e-3
    """Warmup starts at lr * warmup_lr_factor."""
    min_lr_factor: float = 0.05
    """The cosine ends at lr * min_lr_factor."""


@dataclass
class EmaConfig:
    """timm ModelEmaV3, updated after every optimizer update."""

    enabled: bool = True
    """Keep an exponential moving average of the weights."""
    decay: float = 0.9999
    """Upper bound of the decay."""
    warmup: bool = True
    """Ramp the decay up: d = 1 - (1 + s/warmup_gamma)^-warmup_power, capped at decay."""
    warmup_gamma: float = 9.0
    """Warmup gamma; with power 1 this is the reference's d = min(decay, (1+n)/(10+n))."""
    warmup_power: float = 1.0
    """Warmup power."""
    select: Literal["ema", "raw"] = "ema"
    """Which weights drive model selection, early stopping and export."""


@dataclass
class LossConfig:
    """Cross-entropy with class weights and label smoothing."""

    class_weights: Literal["inverse", "none"] = "inverse"
    """Inverse-frequency class weights from the train split (normalised to sum to classes)."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy."""


@dataclass
class AugmentConfig:
    """Train augmentation: a preset, with any parameter overridable (None keeps the preset's)."""

    preset: Literal["jersey", "imagenet", "none"] = "jersey"
    """jersey: the reference's final recipe without flips; imagenet: crop+flip+jitter; none."""
    crop_scale_min: float | None = None
    """Smallest random-resized-crop area as a fraction of the image (jersey: 0.08)."""
    orientation_sensitive: bool | None = None
    """true: a mirror image means something else (digits, text): never flip; false: flip half
    of the images; unset: the preset's (jersey: no flips, imagenet: flips)."""
    hflip_p: float | None = None
    """Horizontal flip probability (jersey: 0, it mirrors digits)."""
    rotate_degrees: float | None = None
    """Affine rotation range +-degrees."""
    translate: float | None = None
    """Affine translation as a fraction of the side."""
    shear_degrees: float | None = None
    """Affine shear range +-degrees."""
    perspective_p: float | None = None
    """Probability of a perspective warp."""
    color_jitter: float | None = None
    """Brightness/contrast/saturation jitter strength."""
    blur_p: float | None = None
    """Gaussian blur probability (jersey: 1.0, sigma 0.5-3.5 px)."""
    degrade_p: float | None = None
    """Probability of applying the degradation block (pixelate, down-up, noise, zoom)."""
    jpeg_p: float | None = None
    """Probability of JPEG re-compression (done in the loader workers)."""
    erase_p: float | None = None
    """Random-erasing probability."""


@dataclass
class TrainConfig:
    """The loop: length, precision, checkpoints, resume, early stopping."""

    epochs: int = 200
    """Number of epochs."""
    seed: int = 42
    """Seed for python, numpy, torch, the sampler and the augmentation generator."""
    deterministic: bool = False
    """Use deterministic algorithms (slower; cudnn.benchmark off, TF32 off)."""
    output_dir: str = ""
    """Run directory (empty: runs/<recipe name>)."""
    resume: str = ""
    """Resume from a run directory or checkpoint folder, 'auto' (latest of output_dir), or
    'auto_or_new' (latest if there is one, else a new run: for job schedulers)."""
    resume_force: bool = False
    """Resume even though settings that the checkpoint depends on changed (recorded)."""
    resume_fallback: bool = False
    """If the newest checkpoint is damaged, resume from the newest intact one."""
    overwrite: bool = False
    """Allow starting a fresh run in an output_dir that already has checkpoints."""
    mixed_precision: Literal["auto", "fp16", "bf16", "no"] = "auto"
    """auto: accelerate launch's --mixed_precision if given, else bf16 on GPUs of compute
    capability >= 8.0, fp16 (+GradScaler) on older GPUs, bf16 on CPUs with native bf16, else no."""
    compile: bool = False
    """torch.compile the model for the training step (the first steps pay the compilation)."""
    require_gpu: bool = field(
        default_factory=lambda: os.environ.get("CLASSIFIER_TRAINING_REQUIRE_GPU", "") == "1"
    )
    """Stop with an error when CUDA is unavailable instead of training on the CPU (default: on
    when $CLASSIFIER_TRAINING_REQUIRE_GPU is 1, as in the Docker image)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer update."""
    max_batches_per_epoch: int = 0
    """Cap on train batches per epoch (0: the whole loader); for smoke runs and benchmarks."""
    checkpoint_every_updates: int = 0
    """Also save a 'last' checkpoint every N optimizer updates (0: only at epoch ends)."""
    checkpoint_every_minutes: float = 5.0
    """Also save a 'last' checkpoint when this many minutes passed since the last one (0: off)."""
    keep_top_k: int = 3
    """Best checkpoints kept by the monitored metric (plus 'last')."""
    checkpoint_background: bool = True
    """Finish each checkpoint (fsync, sha256 ledger, rename, pruning) in a background thread
    while training goes on; false: the whole write blocks, as before."""
    monitor: str = "val/acc_top1"
    """Metric for model selection and early stopping (of the selected weights)."""
    monitor_mode: Literal["max", "min"] = "max"
    """Whether a larger monitored value is better."""
    early_stop_patience: int = 20
    """Epochs without improvement before stopping (0 disables early stopping)."""
    early_stop_min_delta: float = 0.001
    """Smallest change that counts as an improvement."""
    eval_test: bool = True
    """Evaluate the test split with the selected best weights at the end."""
    collective_timeout_minutes: float = 120.0
    """Several processes: how long one waits for the others at a barrier or gather before the
    run fails (the main process alone hashes the dataset, starts W&B and exports)."""


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl and Weights & Biases."""

    wandb: bool = False
    """Log to Weights & Biases through Accelerate's tracker (WANDB_MODE=offline works)."""
    project: str = "classifier-training"
    """W&B project."""
    run_name: str = ""
    """W&B run name (empty: the recipe name)."""
    group: str = ""
    """W&B group that collects related runs, e.g. the seeds of one recipe (empty: none)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    log_every: int = 20
    """Optimizer updates between progress lines when stdout is not a terminal."""
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    """auto: a bar on a terminal, lines otherwise."""


@dataclass
class ExportConfig:
    """The ONNX deployment bundle written by the export hook and ``python -m export``."""

    checkpoint: str = "best"
    """best, last, or a checkpoint folder."""
    weights: Literal["selected", "ema", "raw"] = "selected"
    """Which weights to export (selected: ema.select)."""
    opset: int = 17
    """ONNX opset (the TorchScript exporter writes 17 as a single file)."""
    verify_images: int = 32
    """Validation images compared between onnxruntime and PyTorch."""
    atol: float = 1e-4
    """Largest allowed |logit difference| between onnxruntime and PyTorch (fp32)."""
    precision: str = "fp32"
    """ONNX files to write, comma-separated: fp32 (model.onnx, always), fp16 (model.fp16.onnx),
    int8 (model.int8.onnx), e.g. fp32,fp16,int8."""
    max_accuracy_drop: float = 0.01
    """An fp16/int8 file is not written when its top-1 accuracy on the validation + test images
    is more than this below fp32's (0.01 = one point)."""
    int8_calibration_images: int = 256
    """Training images (deployment preprocessing) that calibrate the INT8 activation ranges."""
    target_precision: float = 0.99
    """Abstain threshold: the lowest calibrated confidence whose accepted validation predictions
    reach this precision (stored in labels_mapping.json as calibration.threshold)."""


@dataclass
class HooksConfig:
    """Epoch hooks (observers) that run on the main process."""

    enabled: list[str] = field(
        default_factory=lambda: [
            "dataset_stats",
            "model_info",
            "augment_preview",
            "confusion_matrix",
            "history",
            "sample_predictions",
            "sampler_distribution",
            "export",
        ]
    )
    """Hooks to run, by name."""
    sample_grid: int = 16
    """Images in the sample-predictions grid."""
    confusion_every: int = 10
    """Draw the confusion matrices every N epochs (and always at the best and last epochs)."""
    near_duplicate_distance: int = 8
    """dataset_stats: report cross-split image pairs whose 64-bit dHash differs in at most this
    many bits and whose 16x16 colour thumbnails differ by at most 8/255 on average (-1 skips
    the check)."""
    fail_on_near_duplicates: bool = False
    """dataset_stats: stop before training when such cross-split pairs exist (a leak)."""
    background: Literal["process", "thread", "inline"] = "process"
    """Where hooks draw their figures: a worker process beside training (default), a thread,
    or inline in the hook round (blocks training)."""


@dataclass
class Recipe:
    """A whole training recipe."""

    name: str = "run"
    """Recipe name; the default run directory is runs/<name>."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)

    @property
    def run_dir(self) -> Path:
        """The run directory: ``train.output_dir`` or ``runs/<name>``."""
        return Path(self.train.output_dir or os.path.join("runs", self.name))


def check_recipe(recipe: Recipe) -> None:
    """Semantic checks that types alone cannot express (run after CLI overrides, before anything
    is written; :func:`~classifier_training.recipe_checks.recipe_problems`). The first problem
    starts the message, so it names the recipe field."""
    problems = recipe_problems(recipe)
    if problems:
        raise RecipeError("invalid recipe: " + "; ".join(problems))


def parse_recipe(argv: Sequence[str] | None = None) -> Recipe:
    """Parse ``--recipe FILE.yaml [FILE2.yaml ...]`` plus dotted overrides into a Recipe.

    Two stages, as simple-parsing does for its own config-file flag: ``--recipe`` is read first,
    its files are validated and decoded by :func:`~classifier_training.recipe_yaml.from_yaml`,
    and that Recipe is handed to simple-parsing as the default object the dotted flags override.
    :func:`check_recipe` then refuses values no type can rule out. ``--help`` lists every field
    with its docstring. Abbreviated flags are refused (``--rec`` is not ``--recipe``).
    """
    import simple_parsing
    from simple_parsing import ArgumentGenerationMode, NestedMode

    recipe_flag = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    recipe_flag.add_argument("--recipe", nargs="+", action="extend", default=[])
    known, rest = recipe_flag.parse_known_args(argv)
    default = from_yaml(Recipe, known.recipe)

    parser = simple_parsing.ArgumentParser(
        argument_generation_mode=ArgumentGenerationMode.NESTED,
        nested_mode=NestedMode.WITHOUT_ROOT,
        allow_abbrev=False,
        description="Train an image classifier (timm + Accelerate). Flags override the recipe.",
    )
    parser.add_argument(
        "--recipe",
        nargs="+",
        metavar="FILE.yaml",
        default=[],
        help="Recipe file(s) (.yaml/.yml) over the defaults below; later files win.",
    )
    parser.add_arguments(Recipe, dest="config", default=default)
    recipe: Recipe = parser.parse_args(rest).config
    check_recipe(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe file (validated) with optional CLI-style overrides; for code and tests."""
    return parse_recipe(["--recipe", str(path), *overrides])


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain nested dict of the recipe (tuples as lists), suitable for YAML/JSON/W&B."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(recipe))  # type: ignore[no-any-return]


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML atomically (temp file, fsync, rename)."""
    atomic_write_text(path, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
