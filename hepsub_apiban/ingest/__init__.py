"""HEP ingest: the listeners, the per-packet path, the sightings, the worker processes, replay."""
