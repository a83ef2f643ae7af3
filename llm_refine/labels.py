"""The schedule labels every layer shares: the baseline, the refined schedule, and their column order."""

BASELINE = "linear"
REFINED = "refined"
SCHEDULE_ORDER = (BASELINE, REFINED, "cosine", "wsd")
