"""Ray Data plumbing: sources, decoding, the GPU actor, merge workers, the Parquet sink, resume, the CLI."""
