-- export_subset: a selection (the result of another sql/ query, registered as `selection` by export.py)
-- joined with `examples`: every example column, one row per example (its best-scoring selected target
-- set when several selected it), plus original_label, relabelled, selected_for, influence_method,
-- influence_score, influence_rank. A selection with a non-null `new_label` (relabel.sql) puts that label in
-- `label`; `original_label` keeps the given one (export.py adds an empty `new_label` to other selections).
-- Parameters: $method (only the selection's rows of this estimator are exported).
WITH best AS (
    SELECT sample_id, target_set, method, score, rank, new_label
    FROM selection
    WHERE method = $method
    QUALIFY row_number() OVER (PARTITION BY sample_id ORDER BY score DESC, target_set) = 1
)
SELECT e.* REPLACE (coalesce(b.new_label, e.label) AS label), e.label AS original_label,
       b.new_label IS NOT NULL AS relabelled, b.target_set AS selected_for, b.method AS influence_method,
       b.score AS influence_score, b.rank AS influence_rank
FROM best AS b
JOIN examples AS e USING (sample_id)
ORDER BY b.score DESC, e.sample_id;
