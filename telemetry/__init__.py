"""Metrics and logging conventions shared by every MEG service."""
