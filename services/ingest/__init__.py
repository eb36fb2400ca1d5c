"""Ingest: the public front door. Validates requests and routes each to a DP group."""
