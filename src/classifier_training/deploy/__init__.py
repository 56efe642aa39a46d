"""The deployment side: the ONNX bundle, and what reads it.

``onnx_export`` (torch) builds and verifies the bundle; ``export_cli`` is ``python -m export``.
``onnx_classifier``, ``predict`` and ``evaluate`` need numpy, PIL and onnxruntime only (no torch),
so a consumer installs ``classifier-training[infer]`` without PyTorch. This ``__init__`` imports
nothing, so importing one torch-free module never pulls torch in.
"""
