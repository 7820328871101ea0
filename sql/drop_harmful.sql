-- drop_harmful: every scored example except the most harmful fraction for one target set and method
-- (mislabel candidates removed): drops the ceil($fraction * n) lowest scores, keeps ranks 1 .. n - that.
-- Parameters: $target_set, $method, $fraction (0 <= fraction < 1).
-- Returns: sample_id, target_set, method, score, rank, percentile; ordered by rank.
WITH ranking AS (
    SELECT *, count(*) OVER () AS n
    FROM scores
    WHERE target_set = $target_set
      AND method = $method
)
SELECT sample_id, target_set, method, score, rank, percentile
FROM ranking
WHERE rank <= n - ceil($fraction * n)
ORDER BY rank;
