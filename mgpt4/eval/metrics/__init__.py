"""Scores for ``mgpt4 eval``: caption metrics (COCO scorers), yes/no parsing (POPE), VQA matching."""
