"""Tenant training data: upload a JSONL file and get a validation report back."""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from pathlib import Path

from fastapi import APIRouter, HTTPException, UploadFile, status
from fastapi.responses import JSONResponse

from api.deps import CurrentTenant, SettingsDep
from api.schemas import DatasetReportOut, DatasetUploaded, ErrorOut, LineErrorOut
from jobs import admission
from training import dataset

router = APIRouter(prefix="/api/ai/datasets", tags=["datasets"])
_CHUNK = 1024 * 1024


def _report_out(report: dataset.DatasetReport, filename: str) -> DatasetReportOut:
    return DatasetReportOut(
        totalLines=report.total_lines,
        valid=report.valid,
        invalid=report.invalid,
        duplicates=report.duplicates,
        tooLong=report.too_long,
        usable=report.usable,
        qualityScore=report.quality_score,
        errors=[LineErrorOut(file=filename, line=e.line, message=e.message) for e in report.errors],
        errorsTruncated=report.errors_truncated,
    )


class _LineLimits:
    """Counts lines and their lengths as the upload streams in; 413 past either limit."""

    def __init__(self, max_lines: int, max_line_bytes: int) -> None:
        self.max_lines, self.max_line_bytes = max_lines, max_line_bytes
        self.lines, self.current = 0, 0

    def feed(self, chunk: bytes) -> None:
        parts = chunk.split(b"\n")
        for i, part in enumerate(parts):
            self.current += len(part)
            if self.current > self.max_line_bytes:
                raise HTTPException(
                    status.HTTP_413_CONTENT_TOO_LARGE,
                    f"line {self.lines + 1} is longer than the {self.max_line_bytes} byte limit "
                    "of one example",
                )
            if i < len(parts) - 1:  # a newline ends this line
                self.lines += 1
                self.current = 0
                if self.lines > self.max_lines:
                    raise HTTPException(
                        status.HTTP_413_CONTENT_TOO_LARGE,
                        f"the file has more than {self.max_lines} lines (MAX_UPLOAD_LINES); "
                        "split it into several uploads",
                    )


def _safe_name(filename: str | None) -> str:
    stem = Path(filename or "").stem
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).strip("._")[:80]
    return f"{stem or 'upload-' + time.strftime('%Y%m%d-%H%M%S')}.jsonl"


@router.post(
    "/{company_id}",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetUploaded,
    responses={
        422: {
            "model": DatasetUploaded | ErrorOut,
            "description": "no usable example (nothing stored), or no file in the form",
        }
    },
)
async def upload_dataset(
    company_id: CurrentTenant, file: UploadFile, settings: SettingsDep
) -> DatasetUploaded | JSONResponse:
    """Validate a JSONL file and add it to the tenant's training data (same name replaces)."""
    name = _safe_name(file.filename)
    tenant_dir = settings.tenant_data_dir(company_id)
    stored_bytes, stored_files = await asyncio.to_thread(
        admission.stored_data, settings, company_id, name
    )
    max_files = settings.limit(company_id, "max_data_files")
    if stored_files + 1 > max_files:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"company '{company_id}' already has {stored_files} dataset files, its limit is "
            f"{max_files} (TENANT_MAX_DATA_FILES); upload under an existing file's name to "
            "replace it, or merge files",
        )
    room = settings.limit(company_id, "max_data_bytes") - stored_bytes
    tenant_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=tenant_dir)
    tmp = Path(tmp_name)
    try:
        size = 0
        limits = _LineLimits(settings.max_upload_lines, dataset.MAX_LINE_BYTES)
        with open(fd, "wb") as out:
            while chunk := await file.read(_CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise HTTPException(
                        status.HTTP_413_CONTENT_TOO_LARGE,
                        f"the file is larger than the {settings.max_upload_bytes} byte limit",
                    )
                if size > room:
                    raise HTTPException(
                        status.HTTP_413_CONTENT_TOO_LARGE,
                        f"company '{company_id}' would store more than "
                        f"{settings.limit(company_id, 'max_data_bytes')} bytes of training data "
                        f"(TENANT_MAX_DATA_BYTES; {max(room, 0)} bytes left); remove or replace "
                        "a file first",
                    )
                limits.feed(chunk)
                out.write(chunk)
        report, _ = await asyncio.to_thread(dataset.analyze, [tmp], settings.max_example_chars)
        report_out = _report_out(report, name)
        if report.usable == 0:
            body = DatasetUploaded(
                success=False,
                message=f"nothing stored: {report.problem() or 'no usable example'}",
                file=None,
                report=report_out,
                tenantDatasetSize=0,
                tenantQualityScore=0.0,
            )
            return JSONResponse(status_code=422, content=body.model_dump())
        tmp.replace(tenant_dir / name)
    finally:
        tmp.unlink(missing_ok=True)
    total, _ = await asyncio.to_thread(admission.analyze_tenant, settings, company_id)
    skipped = report.total_lines - report.usable
    return DatasetUploaded(
        success=True,
        message=f"stored {name}: {report.usable} usable examples"
        + (f", {skipped} lines skipped (see errors)" if skipped else ""),
        file=name,
        report=report_out,
        tenantDatasetSize=total.usable,
        tenantQualityScore=total.quality_score,
    )
