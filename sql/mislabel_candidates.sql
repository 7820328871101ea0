-- mislabel_candidates: the $n most harmful examples of one ranking (its lowest scores: for influence the most
-- negative, for the signals and `fused` the lowest-ranked), with their text and label: the examples most likely
-- mislabeled.
-- Parameters: $target_set, $method, $n.
-- Returns: sample_id, target_set, method, score, rank, percentile, then every column of `examples`;
-- ordered from the most harmful.
SELECT s.sample_id, s.target_set, s.method, s.score, s.rank, s.percentile,
       e.* EXCLUDE (sample_id)
FROM scores AS s
JOIN examples AS e USING (sample_id)
WHERE s.target_set = $target_set
  AND s.method = $method
ORDER BY s.rank DESC
LIMIT $n;
