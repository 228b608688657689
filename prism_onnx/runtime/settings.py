"""RunnerSettings: everything `prism run` is told, one frozen object, checked once.

The CLI builds its `prism run` options from these fields' metadata (cli.settings_options, as it does for
ExportSettings), so an option and the setting it fills cannot drift apart; DeviceHost(bundle, settings)
reads nothing else. Checks that involve several settings (--http needs --serve) or the bundle (the number
of --peers, --min-devices within the devices) live here, once: `check(devices)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PrismError
from ..manifest import option

LOG_LEVELS = ("debug", "info", "warning", "error")
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")  # device.GRAPH_OPTIMIZATION's keys


def parse_peers(peers: str) -> list[tuple[str, int]]:
    """'HOST:PORT,HOST:PORT,...' -> [(host, port)], or one PrismError naming the entry that is not HOST:PORT."""
    out = []
    for item in peers.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise PrismError(f"--peers: '{item.strip()}' is not HOST:PORT (e.g. 10.0.0.10:5555)")
        out.append((host, int(port)))
    return out


@dataclass(frozen=True)
class RunnerSettings:
    """How one runner runs its device bundle (`prism run`)."""

    peers: str = field(metadata=option("HOST:PORT of every device, in rank order (this one included).", required=True))
    rank: int | None = field(default=None, metadata=option("This device's rank (default: the bundle's).", min=0))
    serve: int | None = field(default=None, metadata=option("Accept client requests on this port.", min=1, max=65535))
    threads: int = field(default=1, metadata=option("onnxruntime threads.", min=1))
    timeout: float = field(default=10.0, metadata=option("Seconds to wait for a peer's means at one exchange point.",
                                                       min=0.1))
    peer_timeout: float = field(default=60.0, metadata=option("Seconds to wait at start-up for every peer to come up.",
                                                            min=0.1))
    heartbeat_timeout: float = field(default=1.0, metadata=option(
        "A peer silent for this long is lost: the requests it was part of are rerun without it. The least time: "
        "each peer's timeout grows with the jitter its own heartbeats show, up to 10x (at least 10 s).", min=0.3))
    bind: str | None = field(default=None, metadata=option(
        "Address to listen on (default: this device's own HOST in --peers; '*' for every interface)."))
    keys: str | None = field(default=None, metadata=option(
        "This device's CurveZMQ keys (default: BUNDLE/keys, written by `prism keys`).", path=True))
    insecure: bool = field(default=False, metadata=option(
        "No authentication or encryption (a trusted, isolated network only).", flag_only=True))
    max_cache_mb: float = field(default=1024.0, metadata=option(
        "Key/value cache one generation request may hold on this device (the tail decodes).", min=0))
    min_devices: int = field(default=1, metadata=option(
        "With --serve: below this many live devices, requests fail at once, naming the lost devices (above it, a "
        "lost device's requests are rerun over the others).", min=1))
    http: int | None = field(default=None, metadata=option(
        "Also serve the OpenAI-compatible HTTP API on this port (needs --serve and the `serve` extra).",
        min=1, max=65535))
    http_max_connections: int = field(default=64, metadata=option(
        "With --http: connections (or requests) open at once; beyond, a request gets 503 at once (uvicorn's "
        "limit_concurrency).", min=2, max=100000))
    http_header_timeout: float = field(default=10.0, metadata=option(
        "With --http: seconds a connection has to send a whole request line and headers (408 and closed after).",
        min=0.1))
    http_body_timeout: float = field(default=30.0, metadata=option(
        "With --http: seconds a request body has to arrive whole (408 and closed after).", min=0.1))
    http_max_body_mb: float = field(default=16.0, metadata=option(
        "With --http: largest request body in MiB; a longer declared length is refused (413) before it is read.",
        min=0.001))
    http_max_bodies: int = field(default=4, metadata=option(
        "With --http: request bodies read at once (each up to --http-max-body-mb): bounds the memory they take.",
        min=1, max=1024))
    served_model_name: str | None = field(default=None, metadata=option(
        "The model name of the HTTP API (default: the export's source id or folder name)."))
    providers: str = field(default="CPU", metadata=option(
        "onnxruntime execution providers in order of preference (CPU, CUDA, TensorRT, CoreML, XNNPACK... as the "
        "installed onnxruntime has them; the ExecutionProvider suffix is optional); CPU is always the last resort.",
        flag="--provider", metavar="NAME[,NAME]"))
    optimization: str = field(default="all", metadata=option(
        "onnxruntime graph optimization level of the device's sessions.", flag="--graph-optimization",
        choices=GRAPH_OPTIMIZATION_LEVELS))
    split: str | None = field(default=None, metadata=option(
        "With --serve: how requests are split over the devices: even, one weight per device (e.g. from `prism "
        "profile`), or auto (weights from each device's measured speed, so they finish together; at CR > 1 the "
        "outputs then change with the measurements). Default: the export's --split if it has one, else even, so "
        "that identical requests give identical outputs.", metavar="even|W,W,...|auto"))
    inflight: int = field(default=1, metadata=option(
        "Requests of one coordinator this device runs at once (pipelining: while one waits for another device's "
        "means, the next computes).", flag="--max-inflight", min=1, max=16))
    max_client_inflight: int = field(default=8, metadata=option(
        "With --serve: requests of one client (key) admitted at once; more wait in its queue. One client's "
        "flood never takes another client's turn.", min=1, max=32))
    max_client_queue: int = field(default=16, metadata=option(
        "With --serve: requests of one client (key) waiting beyond --max-client-inflight; more are refused "
        "at once as busy (HTTP 503).", min=0, max=64))
    batch_wait_ms: float = field(default=2.0, metadata=option(
        "With --serve: concurrent requests that get the same plan (equal token count) run as one batch; while "
        "other requests are running, wait up to this long for more to join (0: no batching).", min=0, max=100))
    batch_pad: bool = field(default=False, metadata=option(
        "With --serve: also batch text requests of different lengths, padded to the longest. Exact at CR=1; at "
        "CR > 1 a request's outputs then depend on what it was batched with.", flag_only=True))
    slowdown: float = field(default=1.0, metadata=option(
        "Emulate a board this many times slower (sleep after each onnxruntime call): for testing mixed fleets on "
        "one machine.", flag="--emulate-slowdown", min=1.0))
    log_level: str = field(default="info", metadata=option("Log lines on stderr at this level and above.",
                                                         choices=LOG_LEVELS))

    def __post_init__(self):
        if self.http is not None and self.serve is None:
            raise PrismError("--http needs --serve PORT: the HTTP server talks to this runner's client port")
        if not 1 <= self.inflight <= 16:
            raise PrismError(f"--max-inflight {self.inflight}: must be between 1 and 16")
        parse_peers(self.peers)

    def check(self, devices: int, rank: int) -> list[tuple[str, int]]:
        """These settings against an export of `devices` devices run as `rank` -> the peers' addresses."""
        addrs = parse_peers(self.peers)
        if len(addrs) != devices:
            raise PrismError(f"--peers lists {len(addrs)} devices, this export has {devices}")
        if not 1 <= self.min_devices <= devices:
            raise PrismError(f"--min-devices {self.min_devices}: must be between 1 and this export's {devices} "
                             f"devices")
        if self.serve is not None and self.serve == addrs[rank][1] and self.bind in (None, addrs[rank][0]):
            raise PrismError(f"--serve {self.serve} is this device's own peer port in --peers: give clients "
                             f"another port")
        return addrs

    def check_options(self, bundle) -> None:
        """The options against the device folder `bundle` (its manifest only; DeviceHost verifies the files):
        the number of --peers, --min-devices, --serve, --split. A PrismError here is a misused option (the
        CLI exits 2); a missing or unreadable manifest is a BundleError of its own."""
        from pathlib import Path

        from .bundle import MANIFEST, read_manifest
        from .split import parse_split

        m = read_manifest(Path(bundle) / MANIFEST)
        devices = m.settings.devices
        rank = self.rank if self.rank is not None else m.rank
        if rank is None or not 0 <= rank < devices:
            return  # not a device folder, or another rank than the bundle's: DeviceHost names the problem
        self.check(devices, rank)
        if self.split is not None:
            parse_split(self.split, devices)
