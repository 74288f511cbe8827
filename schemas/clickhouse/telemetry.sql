-- Telemetry: one row per request handled (any status). Same DDL for embedded
-- chDB and a ClickHouse server. {db} and {ttl_days} are filled in by the sink.
-- Timestamps are the telemetry record's epoch-ms fields as DateTime64(3, 'UTC').

CREATE DATABASE IF NOT EXISTS {db};

CREATE TABLE IF NOT EXISTS {db}.telemetry
(
    id                String,
    tenant            LowCardinality(String),
    model             LowCardinality(String),
    model_version     LowCardinality(String),
    task              LowCardinality(String),
    status            LowCardinality(String),
    error_code        LowCardinality(String),
    cache             LowCardinality(String),
    tokens            UInt32,
    batch_size        UInt32,
    worker            LowCardinality(String),
    partition         UInt16,
    offset            UInt64,
    sent_at           DateTime64(3, 'UTC'),
    received_at       DateTime64(3, 'UTC'),
    inference_start   DateTime64(3, 'UTC'),
    inference_end     DateTime64(3, 'UTC'),
    published_at      DateTime64(3, 'UTC'),
    queue_ms          Float32,
    cache_ms          Float32,
    inference_ms      Float32,
    total_ms          Float32,
    compute_ms        Float32,
    cost_usd          Float64
)
ENGINE = MergeTree
PARTITION BY toDate(published_at)
ORDER BY (model, tenant, published_at, id)
TTL toDateTime(published_at) + INTERVAL {ttl_days} DAY
-- lets an insert carry insert_deduplication_token on a non-replicated table:
-- a retried or replayed batch is stored once
SETTINGS non_replicated_deduplication_window = 10000;

-- Per-minute rollups, so dashboards and the autoscaler never scan raw rows.
CREATE TABLE IF NOT EXISTS {db}.telemetry_minute
(
    minute          DateTime('UTC'),
    model           LowCardinality(String),
    tenant          LowCardinality(String),
    worker          LowCardinality(String),
    requests        SimpleAggregateFunction(sum, UInt64),
    ok              SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    rejected        SimpleAggregateFunction(sum, UInt64),
    expired         SimpleAggregateFunction(sum, UInt64),
    hits_l1         SimpleAggregateFunction(sum, UInt64),
    hits_l2         SimpleAggregateFunction(sum, UInt64),
    coalesced       SimpleAggregateFunction(sum, UInt64),
    misses          SimpleAggregateFunction(sum, UInt64),
    tokens          SimpleAggregateFunction(sum, UInt64),
    cost_usd        SimpleAggregateFunction(sum, Float64),
    inference_ms    SimpleAggregateFunction(sum, Float64),
    compute_ms      SimpleAggregateFunction(sum, Float64),
    total_ms_q      AggregateFunction(quantiles(0.5, 0.95, 0.99), Float32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (model, tenant, worker, minute)
TTL minute + INTERVAL {ttl_days} DAY
-- the view's blocks are deduplicated in this table's own log: without the
-- window a replayed insert is dropped from `telemetry` but counted twice here
SETTINGS non_replicated_deduplication_window = 10000;

-- folders created before the setting above was added get it too (idempotent)
ALTER TABLE {db}.telemetry_minute MODIFY SETTING non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.telemetry_minute_mv TO {db}.telemetry_minute AS
SELECT
    toStartOfMinute(published_at) AS minute,
    model, tenant, worker,
    count() AS requests,
    countIf(status = 'ok') AS ok,
    countIf(status = 'error') AS errors,
    countIf(status = 'rejected') AS rejected,
    countIf(status = 'expired') AS expired,
    countIf(cache = 'l1') AS hits_l1,
    countIf(cache = 'l2') AS hits_l2,
    countIf(cache = 'coalesced') AS coalesced,
    countIf(cache = 'miss') AS misses,
    sum(tokens) AS tokens,
    sum(cost_usd) AS cost_usd,
    sum(inference_ms) AS inference_ms,
    sum(compute_ms) AS compute_ms,
    quantilesState(0.5, 0.95, 0.99)(total_ms) AS total_ms_q
FROM {db}.telemetry
GROUP BY minute, model, tenant, worker;

-- Latency per model and minute, small enough for a day of dashboard in well
-- under a second (the rollup above keeps one row per tenant and worker too).
CREATE TABLE IF NOT EXISTS {db}.latency_minute
(
    minute          DateTime('UTC'),
    model           LowCardinality(String),
    requests        SimpleAggregateFunction(sum, UInt64),
    total_ms_q      AggregateFunction(quantiles(0.5, 0.95, 0.99), Float32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (model, minute)
TTL minute + INTERVAL {ttl_days} DAY
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.latency_minute_mv TO {db}.latency_minute AS
SELECT
    toStartOfMinute(published_at) AS minute,
    model,
    count() AS requests,
    quantilesState(0.5, 0.95, 0.99)(total_ms) AS total_ms_q
FROM {db}.telemetry
GROUP BY minute, model;

-- The autoscaler's decisions (PREFIX.autoscale), one row per interval, with
-- the evidence each was made on.
CREATE TABLE IF NOT EXISTS {db}.autoscale_events
(
    at              DateTime64(3, 'UTC'),
    autoscaler      LowCardinality(String),
    group           LowCardinality(String),
    mode            LowCardinality(String),
    desired         UInt16,
    current         UInt16,
    ready           UInt16,
    recommended     UInt16,
    reason          LowCardinality(String),
    lag             UInt64,
    arrival_rps     Float64,
    service_rps     Float64,
    service_source  LowCardinality(String),
    cold_start_s    Float64,
    partitions      UInt16,
    stuck           Array(UInt16),
    missing         Array(LowCardinality(String))
)
ENGINE = MergeTree
PARTITION BY toDate(at)
ORDER BY (group, at)
TTL toDateTime(at) + INTERVAL {ttl_days} DAY
SETTINGS non_replicated_deduplication_window = 10000;
