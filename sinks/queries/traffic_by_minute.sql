-- answers: how traffic, cache and cost move over time: requests per second, hit rate and cost per minute (all models)
SELECT
    minute,
    sum(requests) AS requests,
    round(sum(requests) / 60, 3) AS requests_per_s,
    round((sum(hits_l1) + sum(hits_l2) + sum(coalesced)) / sum(requests), 4) AS hit_rate,
    sum(cost_usd) AS cost_usd
FROM {db}.telemetry_minute
WHERE minute >= toStartOfMinute(now() - toIntervalSecond({since_s}))
GROUP BY minute
ORDER BY minute
