"""The HTTP API: starts and queries workflows."""
