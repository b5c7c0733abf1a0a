"""The labeling job: ``plan.label`` from an input URL to a committed Parquet dataset.

preflight (checks before Ray starts), devices (GPUs or CPUs), shard_source (the plan's
shards as a Ray Data source), tasks (the stateless CPU stages), actors (the model
actor), labels (label maps between the actor and the encode stage), vocab (class
names), sink (workers write spill parts and finalize shards), commit (the driver:
part records -> markers), lease (one writer per output), redo (``--retry-errors``),
dataset_card, interrupt (Ctrl-C / SIGTERM), stderr_filter (Ray's known false alarm).
"""
