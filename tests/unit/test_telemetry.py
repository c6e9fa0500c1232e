"""The pieces of telemetry that need no server: the tenant label cap and the JSON log line."""

from __future__ import annotations

import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from tenanttune.telemetry import OTHER_TENANTS, JsonFormatter, TenantLabels, job_context


def test_tenant_label_is_capped_so_series_do_not_grow_with_tenants() -> None:
    labels = TenantLabels(limit=3)
    assert [labels(f"t{i}") for i in range(5)] == ["t0", "t1", "t2", OTHER_TENANTS, OTHER_TENANTS]
    assert labels("t1") == "t1", "a tenant keeps the label it got"
    assert TenantLabels(limit=0)("acme") == OTHER_TENANTS


def _line(record: logging.LogRecord) -> dict[str, str]:
    out: dict[str, str] = json.loads(JsonFormatter().format(record))
    return out


def test_json_log_line_carries_the_job_and_the_trace() -> None:
    record = logging.LogRecord(
        "tenanttune.activity", logging.INFO, __file__, 1, "%s done", ("x",), None
    )
    tracer = TracerProvider().get_tracer("test")
    token = job_context.set(
        {"job_id": "train-acme-1", "company_id": "acme", "workflow_id": "train-acme-1"}
    )
    try:
        with tracer.start_as_current_span("work") as span:
            line = _line(record)
            trace_id = f"{span.get_span_context().trace_id:032x}"
    finally:
        job_context.reset(token)
    assert line["message"] == "x done" and line["level"] == "INFO"
    assert line["job_id"] == "train-acme-1" and line["company_id"] == "acme"
    assert line["workflow_id"] == "train-acme-1" and line["trace_id"] == trace_id


def test_json_log_line_from_a_workflow_logger_names_the_workflow() -> None:
    record = logging.LogRecord("temporalio.workflow", logging.WARNING, __file__, 1, "m", (), None)
    record.temporal_workflow = {"workflow_id": "deploy-acme-2", "run_id": "r"}
    line = _line(record)
    assert line["workflow_id"] == "deploy-acme-2" and line["job_id"] == "deploy-acme-2"
    assert "trace_id" not in line, "no span, no trace id"
