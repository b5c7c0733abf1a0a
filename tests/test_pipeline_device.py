"""--device gpu|cpu|auto: a run that asks for GPUs on a cluster without them stops with one sentence."""
from __future__ import annotations

import logging

import pytest
from pipeline_helpers import FAST, make_photo_folder

from pipeline import LabelError, label
from pipeline.job.devices import autoscaler_max_gpus, plan_devices


def test_gpus_asked_for_on_a_cluster_without_them_stop_with_one_sentence(ray_session, tmp_path):
    make_photo_folder(tmp_path / "in")
    with pytest.raises(LabelError) as caught:
        label(str(tmp_path / "in"), str(tmp_path / "out"), device="gpu", **FAST)
    message = str(caught.value)
    assert message == ("--device gpu needs 1 GPU per model actor, but the Ray cluster has no GPU and no autoscaler "
                       "that can add GPU nodes: join a cluster with GPUs (--ray-address), or pass --device cpu to "
                       "label on CPUs.")
    assert not (tmp_path / "out").exists()  # no CPU run, and no empty output folder either
    with pytest.raises(LabelError, match=r"^--gpus-per-actor 0.5 needs 0.5 GPU per model actor"):
        label(str(tmp_path / "in"), str(tmp_path / "out"), gpus_per_actor=0.5, **FAST)


def test_auto_says_it_runs_on_cpu(ray_session, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.job.devices"):
        plan = plan_devices(ray_session, "auto", None, 600)
    assert not plan.use_gpu and plan.gpus_per_actor == 0
    assert "labelling on CPU: the Ray cluster has no GPU (pass --device gpu to require one)" in caplog.text
    assert plan_devices(ray_session, "cpu", None, 600).use_gpu is False


@pytest.fixture
def gpu_autoscaler_config(ray_session):
    """The cluster config an autoscaler publishes in the GCS: a GPU node group that may start 4 nodes."""
    from ray._raylet import (
        GCS_AUTOSCALER_CLUSTER_CONFIG_KEY,
        GCS_AUTOSCALER_STATE_NAMESPACE,
    )
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.name, group.max_count = "gpu-workers", 4
    group.resources["GPU"], group.resources["CPU"] = 1, 8
    key, namespace = GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    _internal_kv_put(key, config.SerializeToString(), namespace=namespace)
    yield
    _internal_kv_del(key, namespace=namespace)


def test_gpus_that_an_autoscaler_can_add_are_waited_for_with_a_bound(ray_session, gpu_autoscaler_config, caplog):
    assert autoscaler_max_gpus() == 4
    with caplog.at_level(logging.INFO, logger="pipeline.job.devices"):
        with pytest.raises(LabelError, match=r"^--device gpu: no GPU joined the Ray cluster within 0.5 s although "
                                             r"its autoscaler can add GPU nodes"):
            plan_devices(ray_session, "gpu", None, 0.5)
        with pytest.raises(LabelError, match=r"^--device auto: no GPU joined"):  # auto: GPUs are coming, so wait
            plan_devices(ray_session, "auto", None, 0.5)
    assert caplog.text.count("waiting up to 0.5 s for the Ray autoscaler to start a GPU node") == 2


def test_contradicting_device_options_are_refused(tmp_path):
    from pipeline.job.options import LabelOptions, validate_options

    for options, message in [({"device": "tpu"}, "--device must be one of auto, gpu, cpu, not 'tpu'."),
                             ({"device": "gpu", "gpus_per_actor": 0}, "--device gpu and --gpus-per-actor 0 "
                                                                      "contradict each other; drop one."),
                             ({"gpu_wait_s": -1}, "--gpu-wait must be a number of seconds >= 0, not -1.")]:
        with pytest.raises(LabelError) as caught:
            validate_options(LabelOptions(**options))
        assert str(caught.value) == message


def test_job_spec_takes_the_device(tmp_path):
    from jobs.spec import SpecError, parse_spec

    spec = parse_spec({"input": "/in", "output": "/out", "resources": {"device": "gpu", "gpu_wait_s": 30}})
    assert spec.options["device"] == "gpu" and spec.options["gpu_wait_s"] == 30.0
    with pytest.raises(SpecError, match=r"resources.device: must be one of auto, gpu, cpu, not 'tpu'"):
        parse_spec({"input": "/in", "output": "/out", "resources": {"device": "tpu"}})
    with pytest.raises(SpecError, match="contradict"):
        parse_spec({"input": "/in", "output": "/out", "resources": {"device": "cpu", "gpus_per_actor": 1}})
