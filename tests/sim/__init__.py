"""A deterministic simulation of the ledger protocol: no NATS, no JAX, one seeded RNG."""
