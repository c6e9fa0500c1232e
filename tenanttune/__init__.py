"""TenantTune: one fine-tuned LLM per tenant, trained and deployed as durable Temporal jobs."""

__version__ = "0.1.0"
