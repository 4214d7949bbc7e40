"""`otel_metrics`: Axolotl's OpenTelemetry/Prometheus training metrics (`use_otel_metrics`).

With `use_otel_metrics = true` the main process serves Prometheus metrics over HTTP at
`http://{otel_metrics_host}:{otel_metrics_port}/metrics` while it trains: the last logged train
loss, evaluation loss (and every other numeric `eval_*` metric), learning rate, epoch, gradient
norm and memory use, and a counter of the optimizer steps done. The names, types, help texts and
labels are those Axolotl's callback exposes (through the OpenTelemetry SDK and its Prometheus
exporter, which rewrites the names: `METRICS` below), so Prometheus scrape configs and Grafana
dashboards written for Axolotl keep working. sft writes them with `prometheus_client` alone.

Unlike Axolotl, the server stops when training ends (`on_train_end`): a second run in the same
Python process (a notebook, a test) can then use the same port. Each run has its own registry
(not prometheus_client's global one), holding these metrics and prometheus_client's standard
process_* and python_* ones, which Axolotl's endpoint also serves.
"""

from __future__ import annotations

import errno
import numbers
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys
from sft.config.schema import Config, key
from sft.errors import ModelError, Problem

PACKAGE_HINT = "pip install 'sft-train[metrics]'"


@attrs.frozen
class OtelMetricsKeys:
    use_otel_metrics: bool = key(
        False,
        doc="Serve Prometheus training metrics (Axolotl's OpenTelemetry metrics: loss, eval "
        "metrics, learning rate, epoch, grad norm, memory, steps) at "
        "http://otel_metrics_host:otel_metrics_port/metrics while training (main process; "
        "needs prometheus-client).",
    )
    otel_metrics_host: str = key(
        "localhost",
        doc="Address the metrics server listens on (use_otel_metrics); '0.0.0.0' for all "
        "interfaces.",
    )
    otel_metrics_port: int = key(
        8000, ge=1, le=65535, doc="Port of the metrics server (use_otel_metrics)."
    )


@attrs.frozen
class Metric:
    name: str  # as it appears on /metrics
    kind: str  # "gauge" or "counter"
    help: str
    unit: str = ""  # OpenMetrics' `# UNIT` (the name ends with it, as the exporter writes it)


# The metrics Axolotl 0.19's OpenTelemetryMetricsCallback exposes, under the names
# opentelemetry-exporter-prometheus (0.66b2) gives them: a counter gains `_total`, a unit other
# than "1" is appended ("MB"). Keyed by where the value comes from: a key of the Trainer's logs,
# or "global_steps" (+1 at each optimizer step's end).
METRICS: dict[str, Metric] = {
    "loss": Metric("axolotl_train_loss", "gauge", "Current training loss"),
    "eval_loss": Metric("axolotl_eval_loss", "gauge", "Current evaluation loss"),
    "learning_rate": Metric("axolotl_learning_rate", "gauge", "Current learning rate"),
    "epoch": Metric("axolotl_epoch", "gauge", "Current training epoch"),
    "grad_norm": Metric("axolotl_gradient_norm", "gauge", "Gradient norm"),
    "memory_usage": Metric(
        "axolotl_memory_usage_MB", "gauge", "Current memory usage in MB", unit="MB"
    ),
    "global_steps": Metric(
        "axolotl_global_steps_total", "counter", "Total training steps completed"
    ),
}
# Any other numeric evaluation metric `eval_<name>` is a gauge `axolotl_eval_<name>`, the
# characters a Prometheus name cannot hold (and runs of `_`) made one `_`, as the exporter does.
EVAL_HELP = "Evaluation metric: {key}"
# The labels the exporter puts on every sample: the OpenTelemetry meter's name.
LABELS: dict[str, str] = {
    "otel_scope_name": "axolotl.training",
    "otel_scope_schema_url": "",
    "otel_scope_version": "",
}
_INVALID = re.compile(r"[^a-zA-Z0-9:]+")


def metric_name(log_key: str) -> str:
    """The /metrics name of a logged value: from `METRICS`, else `axolotl_` + the key made a
    valid Prometheus name as opentelemetry-exporter-prometheus makes it."""
    if log_key in METRICS:
        return METRICS[log_key].name
    return _INVALID.sub("_", f"axolotl_{log_key}")


def _number(value: Any) -> float | None:
    """A logged value as a float (a bool is 0 or 1, a one-element tensor its value), or None."""
    if isinstance(value, numbers.Real):  # Python's and numpy's ints, floats and bools
        return float(value)
    if hasattr(value, "numel") and value.numel() == 1:  # a tensor
        return _number(value.item())
    return None


class TrainingMetrics:
    """A prometheus_client collector of one run's values: the last value of each gauge (none
    before its first value, as with OpenTelemetry) and the steps counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gauges: dict[str, tuple[str, float, str]] = {}  # name -> (help, value, unit)
        self._steps: int | None = None

    def set(self, log_key: str, value: float) -> None:
        metric = METRICS.get(log_key)
        help_text = metric.help if metric else EVAL_HELP.format(key=log_key)
        with self._lock:
            self._gauges[metric_name(log_key)] = (help_text, value, metric.unit if metric else "")

    def count_step(self) -> None:
        with self._lock:
            self._steps = (self._steps or 0) + 1

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            gauges = dict(self._gauges)
            steps = self._steps
        names, values = list(LABELS), list(LABELS.values())
        if steps is not None:
            counter = METRICS["global_steps"]
            family = CounterMetricFamily(counter.name, counter.help, labels=names)
            family.add_metric(values, steps)
            yield family
        for name, (help_text, value, unit) in gauges.items():
            gauge = GaugeMetricFamily(name, help_text, labels=names, unit=unit)
            gauge.add_metric(values, value)
            yield gauge


def memory_mb(device: Any) -> float | None:
    """Memory in use now, in MiB: the tensors allocated on the training accelerator, or on the
    CPU this process's resident memory."""
    import torch

    kind = getattr(device, "type", None)
    if kind == "cuda" and torch.cuda.is_available():
        return torch.cuda.memory_allocated(device) / 2**20
    if kind == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        return float(torch.xpu.memory_allocated(device)) / 2**20
    if kind == "mps" and torch.backends.mps.is_available():
        return float(torch.mps.current_allocated_memory()) / 2**20
    try:
        import psutil  # an accelerate dependency
    except ImportError:  # pragma: no cover
        return None
    return float(psutil.Process().memory_info().rss) / 2**20


# Servers started here and not yet stopped, by (host, port): a run that raised never reaches
# on_train_end, and the next run in this process takes its address back.
_SERVING: dict[tuple[str, int], Any] = {}
_SERVING_LOCK = threading.Lock()


def _stop(server: Any) -> None:
    server.shutdown()
    server.server_close()


def serve(metrics: TrainingMetrics, host: str, port: int) -> Any:
    """Serve `metrics` (and the process_* / python_* metrics) at http://host:port/metrics from
    a daemon thread; a `ModelError` naming the address when it cannot listen there."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.gc_collector import GCCollector
    from prometheus_client.platform_collector import PlatformCollector
    from prometheus_client.process_collector import ProcessCollector

    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(metrics)  # type: ignore[arg-type]
    with _SERVING_LOCK:
        leftover = _SERVING.pop((host, port), None)
        if leftover is not None:
            _stop(leftover)
        try:
            server, _thread = start_http_server(port, addr=host, registry=registry)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                why = f"{host}:{port} is already in use (another program, or another run)"
            else:
                why = f"cannot listen on {host}:{port}: {error.strerror or error}"
            raise ModelError(
                f"use_otel_metrics: the Prometheus metrics server cannot start: {why}\n"
                "  fix: set otel_metrics_port to a free port (or otel_metrics_host to an "
                "address of this machine), or stop what listens there"
            ) from error
        _SERVING[(host, port)] = server
    return server


def shutdown(server: Any) -> None:
    """Stop serving and free the port."""
    with _SERVING_LOCK:
        for address, running in list(_SERVING.items()):
            if running is server:
                del _SERVING[address]
    _stop(server)


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [ConfigKeys(OtelMetricsKeys)]


@hookimpl
def sft_validate_config(config: Config) -> Sequence[Problem]:
    from sft.config.ineffective import is_set

    keys = config.section(OtelMetricsKeys)
    if not keys.use_otel_metrics:
        return [
            Problem(
                name,
                "has no effect: use_otel_metrics is not true, so no metrics server starts",
                hint=f"set use_otel_metrics = true, or remove {name}",
                warning=True,
            )
            for name in ("otel_metrics_host", "otel_metrics_port")
            if is_set(keys, name)
        ]
    from sft.hardware import installed

    if not installed("prometheus_client"):
        return [
            Problem(
                "use_otel_metrics",
                "needs prometheus-client, which is not installed",
                hint=PACKAGE_HINT,
                machine=True,
            )
        ]
    return []


def make_callback(host: str, port: int) -> Any:
    from transformers import TrainerCallback

    class PrometheusMetrics(TrainerCallback):  # type: ignore[misc]
        """Axolotl's OpenTelemetryMetricsCallback, with prometheus_client: the values on_log,
        on_step_end and on_evaluate see, served from the main process while it trains."""

        def __init__(self) -> None:
            self.metrics = TrainingMetrics()
            self.server: Any = None
            self.url = f"http://{host}:{port}/metrics"

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if state.is_world_process_zero and self.server is None:
                self.server = serve(self.metrics, host, port)
                print(f"metrics: Prometheus metrics at {self.url}", flush=True)

        def on_log(
            self,
            args: Any,
            state: Any,
            control: Any,
            logs: Mapping[str, Any] | None = None,
            **_: Any,
        ) -> None:
            if self.server is None or not logs:
                return
            for log_key in ("loss", "eval_loss", "learning_rate", "epoch", "grad_norm"):
                value = _number(logs.get(log_key))
                if value is not None:
                    self.metrics.set(log_key, value)
            memory = _number(logs.get("memory_usage"))  # Axolotl's key, if a callback logs it
            if memory is None:
                memory = memory_mb(getattr(args, "device", None))
            if memory is not None:
                self.metrics.set("memory_usage", memory)

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if self.server is None:
                return
            self.metrics.count_step()
            if state.epoch is not None:
                self.metrics.set("epoch", float(state.epoch))

        def on_evaluate(
            self,
            args: Any,
            state: Any,
            control: Any,
            metrics: Mapping[str, Any] | None = None,
            **_: Any,
        ) -> None:
            if self.server is None or not metrics:
                return
            for log_key, raw in metrics.items():
                value = _number(raw)
                if log_key.startswith("eval_") and value is not None:
                    self.metrics.set(log_key, value)

        def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if self.server is not None:
                shutdown(self.server)
                self.server = None

    return PrometheusMetrics()


@hookimpl
def sft_trainer_callbacks(config: Config | None) -> Sequence[Any]:
    keys = config.section(OtelMetricsKeys) if config is not None else None
    if keys is None or not keys.use_otel_metrics:
        return []
    return [make_callback(keys.otel_metrics_host, keys.otel_metrics_port)]
