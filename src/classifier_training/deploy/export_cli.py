"""Export a run to a verified ONNX bundle: the ``python -m export`` command.

    python -m export --run runs/jersey [--checkpoint best|last|PATH] [--weights selected|ema|raw]
        [--opset 17] [--out DIR] [--verify_images 32] [--atol 1e-4] [--data ROOT]
        [--precision fp32,fp16,int8] [--max_accuracy_drop 0.01] [--target_precision 0.99]

Works on finished and interrupted runs alike (any checkpoint the ledger lists). The bundle is
verified against PyTorch with onnxruntime on real validation images before it is moved into
place; on failure nothing is written and the exit status is 1. A requested fp16/int8 variant
that loses more than ``max_accuracy_drop`` accuracy is left out of the bundle (which is still
written) with the reason, and the exit status is 3. ``src/export.py`` (run as
``python -m export``) and the ``classifier-export`` console script both call :func:`main`.

The options besides ``--run``, ``--out`` and ``--data`` are the fields of
:class:`~classifier_training.recipe.ExportConfig` (the recipe's ``export`` section, which the
end-of-training export uses), parsed by simple-parsing: defaults and help live there only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import simple_parsing

from classifier_training.recipe import ExportConfig
from classifier_training.recipe_yaml import RecipeError

VARIANT_REJECTED = 3

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # export never needs pretrained weights


def _parser() -> simple_parsing.ArgumentParser:
    p = simple_parsing.ArgumentParser(
        prog="python -m export",
        description="Export a training run to model.onnx + labels_mapping.json, verified "
        "against PyTorch with onnxruntime on real validation images.",
        add_option_string_dash_variants=simple_parsing.DashVariant.UNDERSCORE_AND_DASH,
    )
    p.add_argument("--run", required=True, type=Path, help="run directory (runs/<name>)")
    p.add_argument(
        "--out", type=Path, default=None, help="bundle folder; when omitted, <run>/export"
    )
    p.add_argument(
        "--data", type=Path, default=None, help="dataset root; when omitted, the recipe's data.root"
    )
    p.add_arguments(ExportConfig, dest="export")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Export, verify and print a summary; 0 on success, 1 (message on stderr) on failure, 3
    when a requested precision variant failed its check (the bundle is written without it)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from classifier_training.checkpoint import CheckpointError
    from classifier_training.data.index import DataError
    from classifier_training.deploy.assess import summary_lines
    from classifier_training.deploy.onnx_export import ExportError, export_run
    from classifier_training.model import PretrainedWeightsError
    from classifier_training.runtime import skip_final_collection

    skip_final_collection()

    try:
        out = export_run(args.run, args.export, out=args.out, data_root=args.data)
    except (
        ExportError,
        CheckpointError,
        DataError,
        RecipeError,
        PretrainedWeightsError,
        OSError,
    ) as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    info = json.loads((out / "export.json").read_text(encoding="utf-8"))
    ver, ck = info["verification"], info["checkpoint"]
    print(f"exported {info['arch']} ({info['num_classes']} classes, {info['weights']} weights)")
    print(
        f"  checkpoint   {ck['path']} (epoch {ck['epoch']}, {ck['monitor']} {ck['monitor_value']})"
    )
    print(
        f"  verified     {ver['n_images']} {info['data']['verify_split']} images, batch sizes "
        f"{ver['batch_sizes']}: top-1 agrees {ver['top1_agree']}, max |logit diff| "
        f"{ver['max_abs_diff']:.2e} <= {ver['atol']:.0e}"
    )
    for line in summary_lines(info):
        print(line)
    print(f"  bundle       {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    if info["rejected_variants"]:
        print(
            f"export: {', '.join(info['rejected_variants'])} not written (see REJECTED above); "
            "the rest of the bundle is in place",
            file=sys.stderr,
        )
        return VARIANT_REJECTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
