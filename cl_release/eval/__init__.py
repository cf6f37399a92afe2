"""Evaluation: regression suites (:mod:`.suite`), the runner (:mod:`.runner`), results and
metrics (:mod:`.results`), the release gates (:mod:`.gates`), diffs and reports (:mod:`.report`).

The suites' vocabulary is defined here, where importing it loads nothing else (the command
line's options and defaults use it; ``cl-release --help`` stays instant).
"""

DEFAULT_SUITE = "registry/regression_tests.jsonl"
MATCH_TYPES = ("contains", "exact", "regex", "not_contains", "json_equal")
CRITICALITIES = ("critical", "high", "medium", "low")  # most severe first
