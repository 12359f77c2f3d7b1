"""The report both offline audits (cql, bcq) end with: exact returns by data-set quality, side by side."""
from __future__ import annotations

from modules.cql.offline import QUALITIES, OfflineResult


def returns_by_quality(ctx, result: OfflineResult, method: str, name: str) -> None:
    """A table of behaviour / BC / naive DQN / the method on each data set, and the medium returns as scalars."""
    base = result.baseline_returns()
    rows = []
    for d, quality in enumerate(QUALITIES):
        dqn, own = result.returns(result.select("dqn", d)), result.returns(result.select(method, d))
        rows.append([quality, base["behaviour"][d].item(), base["bc"][d].item(), dqn, own])
        ctx.scalar(f"return {quality}: {name}", own)
        ctx.scalar(f"return {quality}: DQN", dqn)
    ctx.table("returns by data-set quality (exact, discounted, from the start state)",
              ["data", "behaviour", "BC", "DQN", name], rows)
    ctx.scalar("optimal return V*(start)", result.env.optimal_return)
    for key, value in result.medium_returns(method).items():
        ctx.scalar(f"return medium: {key}", value)
