-- drop_harmful: every scored example except the most harmful fraction for one target set and method
-- (mislabel candidates removed): drops the ceil($fraction * n) lowest scores, keeps ranks 1 .. n - that.
-- Parameters: $target_set, $method, $fraction (0 <= fraction < 1).
-- Returns: sample_id, target_set, method, score, rank, percentile; ordered by rank.
SELECT sample_id, target_set, method, score, rank, percentile
FROM scores
WHERE target_set = $target_set AND method = $method
QUALIFY rank <= count(*) OVER () - ceil(round($fraction * count(*) OVER (), 9))
ORDER BY rank;
