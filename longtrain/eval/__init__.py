"""Evaluation: perplexity by context length, passkey / needle grids, Markdown reports with plots.

Public entry points: `evaluate` (one model, all tasks; the trainer calls it after a stage), `load_for_eval`
(Hugging Face directory or longtrain checkpoint), `write_report` (one model or several side by side),
`summary_table` (accuracy by length, e.g. the demo's before/after table), and `command` (`longtrain eval`).
"""

from longtrain.eval.evaluate import EVAL_TASKS, evaluate, load_results
from longtrain.eval.load import load_for_eval
from longtrain.eval.perplexity import PerplexityResult, perplexity_at_length, perplexity_by_length
from longtrain.eval.report import perplexity_table, summary_table, write_report
from longtrain.eval.retrieval import RetrievalGrid, retrieval_grid

__all__ = ["EVAL_TASKS", "PerplexityResult", "RetrievalGrid", "evaluate", "load_for_eval", "load_results",
           "perplexity_at_length", "perplexity_by_length", "perplexity_table", "retrieval_grid", "summary_table",
           "write_report"]
