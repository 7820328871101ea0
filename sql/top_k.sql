-- top_k: the k most helpful examples of every target set (score = -I(k), higher = more helpful).
-- Self-influence (target set 'self', scorer.SELF_TARGET) ranks no target set and is left out: select it by
-- name with top_fraction, drop_harmful or mislabel_candidates.
-- Parameters: $method (estimator, e.g. 'hyperinf'), $k (examples kept per target set).
-- Returns: sample_id, target_set, method, score, rank, percentile; ordered by target_set, rank.
SELECT sample_id, target_set, method, score, rank, percentile
FROM scores
WHERE method = $method
  AND target_set <> 'self'
  AND rank <= $k
ORDER BY target_set, rank;
