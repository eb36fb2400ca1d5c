"""dpbus services: everything that runs (ingest, publisher, worker, the CLI)."""


def version() -> str:
    """The installed package's version (pyproject.toml's): what ``dpbus --version`` prints
    and each service announces in its NATS discovery info."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("dpbus")
    except PackageNotFoundError:
        return "0.0.0+unknown"  # semantic versioning, as NATS discovery asks
