-- conflicts: examples that help target set A (score > 0) and hurt target set B (score < 0).
-- Parameters: $set_a (helped set), $set_b (hurt set), $method.
-- Returns: sample_id, target_set (= A), method, score, rank, percentile (all for A), hurt_set (= B),
-- hurt_score, hurt_rank; ordered by score_A - score_B descending (sharpest conflicts first), sample_id.
SELECT a.sample_id, a.target_set, a.method, a.score, a.rank, a.percentile,
       b.target_set AS hurt_set, b.score AS hurt_score, b.rank AS hurt_rank
FROM scores AS a
JOIN scores AS b USING (sample_id)
WHERE a.target_set = $set_a
  AND b.target_set = $set_b
  AND a.method = $method
  AND b.method = $method
  AND a.score > 0
  AND b.score < 0
ORDER BY a.score - b.score DESC, a.sample_id;
