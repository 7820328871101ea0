-- drop_issues: every scored example but the k most harmful of one ranking (target set, method), where k is the
-- number of label issues cleanlab finds (`label_suggestions`: its estimate of how many labels are wrong). An
-- automatic cut: how many go follows from the evidence, not from a fixed share (drop_harmful drops a fixed
-- share); which go follows from the ranking.
-- Parameters: $target_set, $method.
-- Returns: sample_id, target_set, method, score, rank, percentile; ordered by rank.
SELECT sample_id, target_set, method, score, rank, percentile
FROM scores
WHERE target_set = $target_set AND method = $method
QUALIFY rank <= count(*) OVER () - (SELECT count(*) FROM label_suggestions WHERE issue)
ORDER BY rank, sample_id;
