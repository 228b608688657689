"""GET /metrics: the Prometheus text format (prometheus_client, in a registry of the server's own).

    prism_http_requests_total{endpoint, status}        HTTP requests answered (endpoint: the route, or
                                                       "other" for unknown paths)
    prism_http_request_duration_seconds{endpoint}      latency histogram, to the last byte (streams too)
    prism_layer_bytes_sent_total{device, layer}        bytes each device sent at each exchange point, from
    prism_layer_bytes_received_total{device, layer}    the devices' own socket counters in each reply
    prism_devices_in_plan                              devices that took part in the last request
    prism_devices_connected, prism_devices,            this runner's view at the time of the scrape
    prism_cluster_ready
    prism_prompt_tokens_total, prism_generated_tokens_total, prism_embedded_inputs_total
    prism_decode_tokens_per_second                     the tail device's decoding speed, last generation
    prism_decode_seconds_total                         (rate of tokens over seconds: the average speed)
    prism_time_to_first_token_seconds                  histogram, at the coordinator
    prism_http_refused_total{reason}                   connections and bodies the HTTP limits refused
                                                       (serve/limits.py): header_timeout, body_timeout,
                                                       body_too_large, too_many_bodies

A scrape counts in prism_http_requests_total after it is answered, so it sees every earlier request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, devices: int):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("prism_http_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("prism_http_request_duration_seconds", "HTTP request latency to the last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.sent = Counter("prism_layer_bytes_sent", "Bytes a device sent at an exchange point (layer)",
                            ["device", "layer"], registry=r)
        self.received = Counter("prism_layer_bytes_received", "Bytes a device received at an exchange point "
                                "(layer)", ["device", "layer"], registry=r)
        self.in_plan = Gauge("prism_devices_in_plan", "Devices that took part in the last request",
                             registry=r)
        self.in_plan.set(devices)
        self.devices = Gauge("prism_devices", "Devices of this deployment (the export's P)", registry=r)
        self.devices.set(devices)
        self.connected = Gauge("prism_devices_connected", "Devices this runner sees alive (itself included)",
                               registry=r)
        self.ready = Gauge("prism_cluster_ready", "1 when every device is up and sees every other", registry=r)
        self.prompt_tokens = Counter("prism_prompt_tokens", "Prompt tokens of generation requests", registry=r)
        self.generated = Counter("prism_generated_tokens", "Tokens generated", registry=r)
        self.embedded = Counter("prism_embedded_inputs", "Inputs embedded", registry=r)
        self.decode_speed = Gauge("prism_decode_tokens_per_second", "Decoding speed of the tail device, last "
                                  "generation request", registry=r)
        self.decode_seconds = Counter("prism_decode_seconds", "Seconds the tail device spent decoding", registry=r)
        self.refused = Counter("prism_http_refused", "Connections and request bodies refused by the HTTP limits",
                               ["reason"], registry=r)
        self.ttft = Histogram("prism_time_to_first_token_seconds", "Time to the first generated token at the "
                              "coordinator", buckets=LATENCY_BUCKETS, registry=r)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def cluster_stats(self, stats: dict) -> None:
        """A reply's stats (program.RequestStats.to_dict): bytes per device and layer, the devices in plan."""
        ranks = stats.get("ranks") or list(range(len(stats.get("per_layer", []))))
        for rank, layers in zip(ranks, stats.get("per_layer", [])):
            for direction, counter in (("sent", self.sent), ("received", self.received)):
                for layer, n in enumerate(layers.get(direction, [])):
                    if n:
                        counter.labels(str(rank), str(layer)).inc(n)
        self.in_plan.set(len(ranks))

    def generation(self, g: dict, prompt_tokens: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated.inc(generated)
        if g.get("decode_tokens_per_s"):
            self.decode_speed.set(g["decode_tokens_per_s"])
            steps = max(0, int(g.get("generated_tokens") or 0) - 1)
            self.decode_seconds.inc(steps / g["decode_tokens_per_s"])
        ttft = g.get("time_to_first_token_ms_at_coordinator", g.get("time_to_first_token_ms"))
        if ttft is not None:
            self.ttft.observe(ttft / 1e3)

    def status(self, status: dict | None) -> None:
        self.ready.set(1 if status and status.get("ready") else 0)
        self.connected.set(len(status.get("connected", [])) if status else 0)

    def text(self) -> bytes:
        return generate_latest(self.registry)
