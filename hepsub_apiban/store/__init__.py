"""The shared store (store.url): PostgreSQL and the objects several agents share."""
