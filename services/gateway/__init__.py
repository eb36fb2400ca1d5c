"""The OpenAI-compatible HTTP gateway: one more client of the bus."""
