-- drop_issues: every scored example but the k most harmful of one ranking (target set, method), where k is the
-- number of label issues cleanlab finds (`label_suggestions`: its estimate of how many labels are wrong), at most
-- ceil($max_fraction * n). An automatic cut: how many go follows from the evidence, not from a fixed share
-- (drop_harmful drops a fixed share); which go follows from the ranking. The cap: cleanlab counts on the warm-up's
-- own probabilities, and a weak warm-up's mistakes on a clean pool look like wrong labels too.
-- Parameters: $target_set, $method, $max_fraction (0 < max_fraction <= 1).
-- Returns: sample_id, target_set, method, score, rank, percentile; ordered by rank.
SELECT sample_id, target_set, method, score, rank, percentile
FROM scores
WHERE target_set = $target_set AND method = $method
QUALIFY rank <= count(*) OVER () - least((SELECT count(*) FROM label_suggestions WHERE issue),
                                         ceil(round($max_fraction * count(*) OVER (), 9)))
ORDER BY rank, sample_id;
