"""The training engine, one job per module; ``src/train.py`` reads them in order.

- ``setup``: recipe -> run folder, Accelerator, data, model, EMA, optimizer, schedule, resume:
  the frozen ``Run`` bundle plus the one mutable ``TrainerState``.
- ``loop``: ``train_one_epoch`` (augment -> forward -> backward -> clip -> step -> EMA -> schedule)
  and the ``LoopCallback`` observers called inside it.
- ``selection``: ``validate`` (raw and EMA weights, the selected ones as ``val/``) and the pure
  ``track_best`` behind early stopping.
- ``epoch_end``: checkpoint, ``metrics.jsonl``, trackers, epoch hooks, early-stop agreement.
- ``finish``: ``test_best``, the test split with the best selected weights.
"""
