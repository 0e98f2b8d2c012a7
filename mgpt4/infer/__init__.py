"""Inference: ``mgpt4 describe`` (batched captions, JSONL) and ``mgpt4 chat`` (multi-turn, streaming).

- ``config``: ``DescribeConfig``, ``ChatConfig`` (light: the CLI builds its options from them).
- ``loading``: a ready model from ``--model RUN_OR_PRESET`` (+ official weight paths), device, dtype.
- ``describe``: ``run_describe`` — inputs from ``data.images``, batched generation, ``DescribeResult``s
  through a callback and in the returned summary, the ``--output`` JSONL file.
- ``chat``: ``ChatSession`` — history, ``/commands``, context trimming, JSON transcripts; ``start_chat``.

Library code: nothing here prints; the terminal side is ``mgpt4.cli.infer`` and ``mgpt4.cli.chat``.
"""
