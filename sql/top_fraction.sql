-- top_fraction: the most helpful fraction of one target set's ranking: ranks 1 .. ceil($fraction * n); with
-- $balance, the most helpful ceil($fraction * n_c) of every label c instead (the pool's label shares kept, so a
-- target set skewed to one label does not strip the others). Every count is ceil(round(fraction * n, 9)): the
-- float product 0.07 * 100 is 7.000000000000001, whose ceiling would keep one example more than 7%.
-- Parameters: $target_set, $method, $fraction (0 < fraction <= 1), $balance (true or false).
-- Returns: sample_id, target_set, method, score, rank, percentile; ordered by rank.
SELECT s.sample_id, s.target_set, s.method, s.score, s.rank, s.percentile
FROM scores AS s
JOIN examples AS e USING (sample_id)
WHERE s.target_set = $target_set AND s.method = $method
QUALIFY CASE
    WHEN $balance THEN row_number() OVER (PARTITION BY e.label ORDER BY s.rank, s.sample_id)
                       <= ceil(round($fraction * count(*) OVER (PARTITION BY e.label), 9))
    ELSE s.rank <= ceil(round($fraction * count(*) OVER (), 9))
END
ORDER BY s.rank, s.sample_id;
