-- answers: the autoscaler's decisions over the window: workers asked for and ready, why, and the evidence (lag, arrival and service rates, cold start, stuck partitions, missing inputs)
SELECT
    at,
    group,
    mode,
    reason,
    current,
    ready,
    recommended,
    desired,
    lag,
    round(arrival_rps, 2) AS arrival_rps,
    round(service_rps, 2) AS service_rps,
    service_source,
    round(cold_start_s, 2) AS cold_start_s,
    stuck,
    missing
FROM {db}.autoscale_events
WHERE at >= now64(3) - toIntervalSecond({since_s})
ORDER BY at
