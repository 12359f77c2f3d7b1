"""llmaudit's curriculum: one folder per topic, each a minimal, correct PyTorch implementation.

Nothing here imports ``llmaudit`` or ``audits``: implementations know nothing of how they are audited.
"""
