"""The control process: runs discovery, publishes endpoint snapshots to workers and
serves the admin HTTP API. Supervised by the master like a worker."""
