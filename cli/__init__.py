"""The `tenanttune` command: local stack, demo, tokens, jobs, queues, selftest, replay."""
