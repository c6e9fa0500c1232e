"""The job front door: the only code that starts, reads and controls jobs."""
