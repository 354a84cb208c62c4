"""Grading: extract the final answer a solution states (extract), normalise it (normalize), decide correct / wrong / unparseable (check), math-verify in a time-boxed worker process (sandbox)."""
