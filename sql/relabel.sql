-- relabel: every scored example, the label of those the evidence marks as wrong replaced by the suggested one:
-- among the ceil($fraction * n) most harmful examples of one ranking (target set, method), those whose label
-- in `label_suggestions` differs from the given one get it ($fraction = 1: every such example).
-- The export writes the new label in `label`, the given one in `original_label` and `relabelled` = true.
-- Parameters: $target_set, $method, $fraction (0 < fraction <= 1).
-- Returns: sample_id, target_set, method, score, rank, percentile, new_label (null: the given label is kept);
-- ordered by rank.
SELECT s.sample_id, s.target_set, s.method, s.score, s.rank, s.percentile,
       CASE WHEN g.suggested_label <> g.label
                 AND s.rank > count(*) OVER () - ceil(round($fraction * count(*) OVER (), 9))
            THEN g.suggested_label END AS new_label
FROM scores AS s
JOIN label_suggestions AS g USING (sample_id)
WHERE s.target_set = $target_set AND s.method = $method
ORDER BY s.rank, s.sample_id;
