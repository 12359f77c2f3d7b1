"""One file per module: its invariants and closed-loop thresholds, nothing else.

Each file registers its audit with ``@llmaudit.audit.audit``; ``llmaudit.registry`` imports them all.
"""
