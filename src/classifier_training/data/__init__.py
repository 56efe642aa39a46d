"""Data pipeline: dataset index, class map, preprocessing contract, sampler, datasets, loaders.

Import the submodules directly. ``index``, ``labels`` and ``preprocess`` are torch-free (stdlib,
PIL, numpy) so the ONNX predictor can use them without torch; ``imbalance``, ``dataset`` and
``loaders`` need torch. This package file deliberately imports nothing.
"""
