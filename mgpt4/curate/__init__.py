"""``mgpt4 curate``: build the stage-2 aligned set the way the MiniGPT-4 paper did (§3.3).

describe (``generate``) → "Continue" under 80 tokens → fix (``fix``: none / rules / openai / hf:PATH)
→ filters (``filters``) → ``image/`` + ``filter_cap.json`` + ``curate.jsonl`` + ``report.html``
(``pipeline``, ``records``, ``report``) → manual review (``pipeline.run_review``). Inputs come from
``images`` (over ``data.images``); the settings are ``config``.
"""
