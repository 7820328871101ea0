-- top_fraction: the most helpful fraction of one target set's ranking: ranks 1 .. ceil($fraction * n).
-- Parameters: $target_set, $method, $fraction (0 < fraction <= 1).
-- Returns: sample_id, target_set, method, score, rank, percentile; ordered by rank.
SELECT sample_id, target_set, method, score, rank, percentile
FROM scores
WHERE target_set = $target_set AND method = $method
QUALIFY rank <= ceil($fraction * count(*) OVER ())
ORDER BY rank;
