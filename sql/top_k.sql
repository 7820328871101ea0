-- top_k: the k most helpful examples of every target set (score = -I(k), higher = more helpful).
-- Parameters: $method (estimator, e.g. 'hyperinf'), $k (examples kept per target set).
-- Returns: sample_id, target_set, method, score, rank, percentile; ordered by target_set, rank.
SELECT sample_id, target_set, method, score, rank, percentile
FROM scores
WHERE method = $method
  AND rank <= $k
ORDER BY target_set, rank;
