"""otel_metrics: Axolotl's use_otel_metrics, a Prometheus endpoint served while training."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from sft import hookimpl
from sft.errors import ConfigError, ModelError

pytest.importorskip(
    "prometheus_client",
    reason="prometheus-client is not installed (pip install 'sft-train[metrics]')",
)

HOST = "127.0.0.1"
# (name, type) as Axolotl's callback exposes them through opentelemetry-exporter-prometheus
AXOLOTL_NAMES = {
    "axolotl_train_loss": "gauge",
    "axolotl_eval_loss": "gauge",
    "axolotl_learning_rate": "gauge",
    "axolotl_epoch": "gauge",
    "axolotl_gradient_norm": "gauge",
    "axolotl_memory_usage_MB": "gauge",
    "axolotl_global_steps_total": "counter",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def samples(text: str) -> dict[str, tuple[str, float, dict[str, str]]]:
    """name -> (type, value, labels) of each sample of a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.name: (family.type, sample.value, sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def refused(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class _Probe:
    """A test plugin: records the logs and, at the start of step `at + 1` (after `at` steps,
    their logs and evaluations, whatever the callbacks' order), the /metrics page."""

    def __init__(self, url: str, at: int = 2, fail_at: int | None = None) -> None:
        self.url, self.at, self.fail_at = url, at, fail_at
        self.logs: list[dict] = []
        self.page: str | None = None
        self.epoch: float | None = None
        self.logged: list[dict] = []  # the logs before the scrape
        self.steps = 0

    @hookimpl
    def sft_trainer_callbacks(self, config):
        from transformers import TrainerCallback

        probe = self

        class Probe(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                probe.logs.append(dict(logs or {}))

            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == probe.at:
                    probe.page = urllib.request.urlopen(probe.url, timeout=10).read().decode()
                    probe.epoch = state.epoch
                    probe.logged = list(probe.logs)

            def on_step_end(self, args, state, control, **kwargs):
                probe.steps += 1
                if state.global_step == probe.fail_at:
                    raise RuntimeError("a run that fails mid-way")

        return [Probe()]


def test_metrics_are_served_while_training_under_axolotls_names(tiny_project, plugins):
    from sft.train.run import train

    port = free_port()
    probe = _Probe(f"http://{HOST}:{port}/metrics")
    plugins.register(probe, "probe")
    config = tiny_project(
        "use_otel_metrics=true",
        f"otel_metrics_host={HOST}",
        f"otel_metrics_port={port}",
        "max_steps=3",
        "logging_steps=1",
        "val_set_size=0.25",
        "eval_steps=2",
    )
    result = train(config)
    assert result.global_step == 3
    assert probe.page is not None
    found = samples(probe.page)
    for name, kind in AXOLOTL_NAMES.items():
        assert found[name][0] == kind, name
        assert found[name][2]["otel_scope_name"] == "axolotl.training"
    train_logs = [log for log in probe.logged if "loss" in log]
    eval_logs = [log for log in probe.logged if "eval_loss" in log]
    assert len(train_logs) == 2 and len(eval_logs) == 1  # steps 1 and 2, the eval at 2
    last = train_logs[-1]
    assert found["axolotl_train_loss"][1] == last["loss"]
    assert found["axolotl_learning_rate"][1] == pytest.approx(last["learning_rate"])
    assert found["axolotl_gradient_norm"][1] == pytest.approx(last["grad_norm"])
    assert found["axolotl_global_steps_total"][1] == 2  # the steps done at the scrape
    assert found["axolotl_epoch"][1] == pytest.approx(probe.epoch)
    assert found["axolotl_eval_loss"][1] == pytest.approx(eval_logs[0]["eval_loss"])
    # every other numeric eval metric is a gauge of its own, as in Axolotl
    assert found["axolotl_eval_runtime"][1] == pytest.approx(eval_logs[0]["eval_runtime"])
    assert found["axolotl_memory_usage_MB"][1] > 1  # this process's memory, in MiB
    assert "process_resident_memory_bytes" in found  # as on Axolotl's endpoint
    # stopped at the end of training: the port is free for the next run
    assert refused(port)
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind((HOST, port))
        again.listen()


def test_a_port_in_use_stops_the_run_before_the_first_step(tiny_project, plugins):
    from sft.train.run import train

    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        probe = _Probe(f"http://{HOST}:{port}/metrics")
        plugins.register(probe, "probe")
        config = tiny_project(
            "use_otel_metrics=true", f"otel_metrics_host={HOST}", f"otel_metrics_port={port}"
        )
        with pytest.raises(ModelError) as error:
            train(config)
    message = str(error.value)
    assert f"{HOST}:{port} is already in use" in message
    assert "set otel_metrics_port to a free port" in message
    assert probe.steps == 0


def test_a_failed_run_does_not_keep_the_port_from_the_next_one(tiny_project, plugins):
    from sft.train.run import train

    port = free_port()
    url = f"http://{HOST}:{port}/metrics"
    probe = _Probe(url, at=1, fail_at=1)
    plugins.register(probe, "probe")
    keys = ("use_otel_metrics=true", f"otel_metrics_host={HOST}", f"otel_metrics_port={port}")
    with pytest.raises(RuntimeError, match="fails mid-way"):
        train(tiny_project(*keys, "max_steps=2"))  # never reaches on_train_end
    assert not refused(port)  # still served: the next run takes the port back
    probe.fail_at, probe.page = None, None
    out = tiny_project.tmp_path / "out2"
    assert train(tiny_project(*keys, "max_steps=2", f"output_dir={out}")).global_step == 2
    assert probe.page is not None
    assert samples(probe.page)["axolotl_global_steps_total"][1] == 1  # this run's own count
    assert refused(port)


def test_metric_names_are_made_valid_as_the_opentelemetry_exporter_makes_them():
    from sft.plugins.otel_metrics import metric_name

    assert metric_name("loss") == "axolotl_train_loss"
    assert metric_name("grad_norm") == "axolotl_gradient_norm"
    # exporter output for these keys: axolotl_eval_a_b_c, axolotl_eval_x_y
    assert metric_name("eval_a.b-c") == "axolotl_eval_a_b_c"
    assert metric_name("eval__x__y") == "axolotl_eval_x_y"


def test_missing_prometheus_client_is_a_machine_problem(tiny_project, monkeypatch):
    import sft.hardware

    real = sft.hardware.installed
    monkeypatch.setattr(sft.hardware, "installed", lambda m: m != "prometheus_client" and real(m))
    with pytest.raises(ConfigError) as error:
        tiny_project("use_otel_metrics=true")
    (problem,) = [p for p in error.value.problems if p.path == "use_otel_metrics"]
    assert problem.machine
    assert "prometheus-client" in problem.message
    assert problem.hint == "pip install 'sft-train[metrics]'"
    tiny_project("otel_metrics_port=9000")  # not asked for: not needed


@pytest.mark.parametrize(("port", "message"), [(0, "must be ≥ 1"), (70000, "must be ≤ 65535")])
def test_ports_outside_1_to_65535_are_refused(tiny_project, port, message):
    with pytest.raises(ConfigError) as error:
        tiny_project("use_otel_metrics=true", f"otel_metrics_port={port}")
    assert message in {p.path: p.message for p in error.value.problems}["otel_metrics_port"]


def test_host_or_port_without_use_otel_metrics_is_a_warning(tiny_project):
    config = tiny_project("otel_metrics_host=0.0.0.0", "otel_metrics_port=9000")
    warned = {p.path: p for p in config.warnings}
    for name in ("otel_metrics_host", "otel_metrics_port"):
        assert warned[name].warning
        assert "has no effect: use_otel_metrics is not true" in warned[name].message
    quiet = tiny_project("otel_metrics_port=8000", "otel_metrics_host=localhost")  # defaults
    assert not [p for p in quiet.warnings if p.path.startswith("otel_metrics_")]

    def served(config) -> int:
        callbacks = config.plugin_set.trainer_callbacks(config)
        return [type(c).__name__ for c in callbacks].count("PrometheusMetrics")

    assert served(config) == 0
    assert served(tiny_project("use_otel_metrics=true")) == 1
