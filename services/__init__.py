"""dpbus services: everything that runs (ingest, publisher, worker, the CLI)."""
