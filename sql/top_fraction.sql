-- top_fraction: the most helpful fraction of one target set's ranking: ranks 1 .. ceil($fraction * n).
-- Parameters: $target_set, $method, $fraction (0 < fraction <= 1).
-- Returns: sample_id, target_set, method, score, rank, percentile; ordered by rank.
WITH ranking AS (
    SELECT *, count(*) OVER () AS n
    FROM scores
    WHERE target_set = $target_set
      AND method = $method
)
SELECT sample_id, target_set, method, score, rank, percentile
FROM ranking
WHERE rank <= ceil($fraction * n)
ORDER BY rank;
