"""Raw to staged: the compactor (watermarks, Delta commits) and the pure merge planning
(dedupe, last change per key, truncates, unchanged TOAST values)."""
