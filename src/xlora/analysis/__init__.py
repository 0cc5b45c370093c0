"""Seeing the mixture: the scalings log, statistics over scalings, plots and ``xlora inspect``.

The plots need the ``viz`` extra (matplotlib); the log and the statistics need only the core.
"""

from xlora.analysis.log import LogEntry, ScalingsLog
from xlora.analysis.stats import (
    ExpertStats,
    MixtureDiff,
    MixtureSummary,
    compare,
    expert_stats,
    mixture_summary,
    token_entropy,
    topk_coverage,
)

__all__ = ["ExpertStats", "LogEntry", "MixtureDiff", "MixtureSummary", "ScalingsLog", "compare", "expert_stats",
           "mixture_summary", "token_entropy", "topk_coverage"]
