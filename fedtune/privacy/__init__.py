"""Privacy: differential privacy, accounting, secure aggregation, and the whole-run checker."""
