"""What the job and the after-labeling commands share: reading inputs and the output format.

sources (listing and reading image bytes under any fsspec URL), decode (bytes -> RGB),
encode (label map -> PNG row), schema (the output table and folder layout), manifest,
resume (shard plan and commit markers), label_files (reading committed labels),
storage (files whole or absent) with retry (storage hiccups vs bad inputs), credentials.
"""
