"""Inference: ``mgpt4 describe`` (batched captions, JSONL) and ``mgpt4 chat`` (multi-turn, streaming).

- ``loading``: a ready model from ``--model RUN_OR_PRESET`` (+ official weight paths), device, dtype.
- ``describe``: collect images / folders / globs / shard sets, batch them, yield ``DescribeResult``.
- ``chat``: ``ChatSession`` — history, ``/commands``, context trimming, JSON transcripts.
- ``render`` / ``commands``: the terminal side (rich panels, live markdown, plain or JSONL when piped);
  ``cli``: the click commands themselves.

Library modules never print; only ``render`` and ``commands`` touch stdout.
"""
