"""The labeling job: ``run.label`` from an input URL to a committed Parquet dataset.

run (``label``: the job's steps, in order), options (``LabelOptions``, ``validate_options``),
preflight (checks before Ray starts), devices (GPUs or CPUs), model_info (the model's provenance
once the devices are known), work (the input listed into the shard plan; what is left to do),
dataflow (the Ray Data graph and the driver loop), shard_source (the plan's shards as a Ray Data
source), tasks (the stateless CPU stages), actors (the model actor), labels (label maps between
the actor and the encode stage), vocab (class names), sink (workers write spill parts and
finalize shards), commit (the driver: part records -> markers), bookkeeping (manifest, summary,
tidy-up), failures (what becomes LabelError), lease (one writer per output), partition (whole
or parts), redo (``--retry-errors``), dataset_card, interrupt (Ctrl-C / SIGTERM), stderr_filter
(Ray's known false alarm).
"""
