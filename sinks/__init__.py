"""Egress for analytics: the ClickHouse sink, named SQL queries, reports."""
