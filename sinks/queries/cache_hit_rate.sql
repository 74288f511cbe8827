-- answers: how much the cache saves: hits by level, hit rate, and the cost the hits would have had at the misses' average cost
SELECT
    model,
    sum(requests) AS requests,
    sum(hits_l1) AS l1,
    sum(hits_l2) AS l2,
    sum(coalesced) AS coalesced,
    sum(misses) AS misses,
    round((sum(hits_l1) + sum(hits_l2) + sum(coalesced)) / sum(requests), 4) AS hit_rate,
    sum(cost_usd) AS cost_usd,
    if(sum(misses) = 0, 0, sum(cost_usd) / sum(misses) * (sum(hits_l1) + sum(hits_l2) + sum(coalesced))) AS cost_saved_usd
FROM {db}.telemetry_minute
WHERE minute >= toStartOfMinute(now() - toIntervalSecond({since_s}))
GROUP BY model
ORDER BY model
