"""Cluster job specs and the entrypoint that Ray job submission runs."""
