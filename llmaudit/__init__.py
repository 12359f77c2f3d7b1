"""llmaudit: an interview-prep lab for LLM / RLHF engineers.

Every topic is a module (a minimal PyTorch implementation that learns a toy task in seconds) plus an
audit (named invariants and closed-loop outcomes). See DESIGN.md for the architecture.
"""
__version__ = "0.1.0"
