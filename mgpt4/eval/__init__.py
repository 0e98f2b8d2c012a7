"""``mgpt4 eval``: measure a model on captions, POPE, VQA, an LLM judge or the built-in shapes.

    cfg = load_config(EvalConfig, None, ["task=pope", "data=pope_random.jsonl", "checkpoint=runs/stage2"])
    result = run_eval(cfg)              # kill it and run again: answered items are not redone
    table = compare("evals/a", "evals/b")

- ``config``: ``EvalConfig`` (task, data, model, decoding, batch size, output, judge endpoint).
- ``pipeline``: ``run_eval`` — load the task's items, answer them in batches through describe's
  generation path (a fresh single-turn prompt per item), journal ``answers.jsonl``, score, write
  ``scores.json`` and ``report.html``.
- ``tasks``: one module per task: how its data is read and how its answers are scored.
- ``metrics``: COCO caption scorers + a Java-free tokenizer, POPE yes/no parsing, VQA normalisation.
- ``report`` (the HTML page) and ``compare`` (two runs side by side, as data).

Library code only: nothing here prints or exits; progress goes through a ``(done, total)`` callback.
"""
