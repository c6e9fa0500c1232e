"""Connecting to Temporal with the configured address, namespace and credentials."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from tenanttune.settings import Settings

COMPANY_ID = SearchAttributeKey.for_keyword("CompanyId")
JOB_KIND = SearchAttributeKey.for_keyword("JobKind")


async def connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        api_key=settings.temporal_api_key,
        tls=settings.temporal_tls,
    )


def job_search_attributes(company_id: str, kind: str) -> TypedSearchAttributes:
    """What the Web UI and `temporal workflow list --query` filter a tenant's jobs on."""
    return TypedSearchAttributes(
        [SearchAttributePair(COMPANY_ID, company_id), SearchAttributePair(JOB_KIND, kind)]
    )
