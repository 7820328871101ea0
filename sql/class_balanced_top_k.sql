-- class_balanced_top_k: the k most helpful examples of each label (from `examples`) for one target set.
-- Parameters: $target_set, $method, $k (examples kept per label).
-- Returns: sample_id, target_set, method, score, rank, percentile, label, label_rank (1 = best of its
-- label; ties broken by sample_id); ordered by label, label_rank.
SELECT s.sample_id, s.target_set, s.method, s.score, s.rank, s.percentile, e.label,
       row_number() OVER (PARTITION BY e.label ORDER BY s.score DESC, s.sample_id) AS label_rank
FROM scores AS s
JOIN examples AS e USING (sample_id)
WHERE s.target_set = $target_set
  AND s.method = $method
QUALIFY label_rank <= $k
ORDER BY e.label, label_rank;
