"""Every configuration setting, declared once: type, default, limits and help.

The loader (``load.py``) validates YAML against these dataclasses, ``kvrouter
validate`` reports against them, and ``kvrouter config-reference`` prints them.
Field types drive conversion: bool, int, float, str, ``Optional[...]``,
``tuple[X, ...]`` (a YAML list), ``dict`` and nested dataclasses.

Fields marked ``derived`` are not YAML keys: the loader computes them (engine
port, host, environment, ...) so the rest of kvrouter never parses engine_args.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from kvrouter import kvpool
from kvrouter.control.names import SLEEP_POLICIES
from kvrouter.timing import DEFAULT_KV_CACHE_GB, DEFAULT_MAX_MODEL_LEN, DEFAULT_WEIGHTS_GB, Timing

ENGINES = ("vllm", "sglang", "sim")
DIALECTS = ("vllm", "sglang")
# where an engine listens without --host: vLLM on every address, SGLang and the simulator on
# loopback
ENGINE_LISTEN_DEFAULT = {"vllm": "0.0.0.0", "sglang": "127.0.0.1", "sim": "127.0.0.1"}
PROCESS_MANAGERS = ("supervisord", "systemd")
BENCH_TOOLS = ("builtin", "vllm", "sglang", "guidellm")
ROUTING_POLICIES = ("cache_aware", "least_outstanding", "power_of_two", "round_robin",
                    "session")   # control/routing.py
_ANY_ADDRESS = ("0.0.0.0", "::", "")


def connect_host(host: str) -> str:
    """Where to connect to reach a server that listens on ``host``: a wildcard or
    ``localhost`` listener is reached on 127.0.0.1 (one address family, no resolver)."""
    return "127.0.0.1" if host in _ANY_ADDRESS or host == "localhost" else host


def host_url(host: str, port: int) -> str:
    host = connect_host(host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def setting(default: Any = None, help: str = "", *, required: bool = False,
            min: float | None = None, max: float | None = None,
            choices: tuple | None = None, kind: str | None = None,
            factory: Any = None) -> Any:
    """Declare one setting. ``kind`` names a special converter (``gpus``, ``keyvalue``,
    ``path``, ``secret``: a non-empty string)."""
    meta = {"help": help, "required": required, "min": min, "max": max,
            "choices": choices, "kind": kind}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def derived(default: Any = None, factory: Any = None) -> Any:
    meta = {"derived": True}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RouterConfig:
    enable_router: bool = setting(True, "Run the router (rendered as the `kvrouter` program/unit).")
    router_host: str = setting("127.0.0.1", "Address the router listens on.")
    router_port: int = setting(8080, "Port the router listens on.", min=1, max=65535)
    api_keys: Tuple[str, ...] = setting(
        (), "Bearer keys accepted on /v1/*; empty means no authentication.", kind="secret")
    admin_token: Optional[str] = setting(
        None, "Bearer token required by state-changing admin endpoints (sleep, wake).",
        kind="secret")
    max_queue_per_model: int = setting(
        256, "Requests that may wait for one model to become ready; more get 503.", min=0)
    connect_timeout_seconds: float = setting(
        5.0, "Timeout to open a connection to an engine.", min=0.01)
    request_timeout_seconds: float = setting(
        600.0, "Timeout for the engine's first response byte (prefill of long prompts is slow).",
        min=0.01)
    stream_idle_timeout_seconds: float = setting(
        300.0, "Timeout between two chunks of a streamed response.", min=0.01)
    ready_timeout_seconds: float = setting(
        120.0, "How long a request waits for its engine to become ready before 503.", min=0)
    max_body_mb: float = setting(32.0, "Largest request body accepted (413 above).", min=0.001)
    max_upload_mb: float = setting(
        25.0, "Largest multipart upload (an audio file to /v1/audio/transcriptions): 413 on "
        "its Content-Length, before the body is read; at most max_body_mb.", min=0.001)
    header_timeout_seconds: float = setting(
        30.0, "Time a client has to send a request's whole header block (not per byte).",
        min=0.1)
    keepalive_timeout_seconds: float = setting(
        75.0, "How long an idle keep-alive connection is kept open.", min=0.1)
    max_connections: Optional[int] = setting(
        None, "Client connections served at once (more wait in the listen backlog); default: "
        "what the open files limit allows, two descriptors a connection.", min=1)
    max_connections_per_client: Optional[int] = setting(
        None, "Connections one client address may hold at once (more are answered 503 at "
        "once, with one warning a minute); default: a fair share, an eighth of "
        "max_connections and at least 64.", min=1)
    trusted_proxies: Tuple[str, ...] = setting(
        (), "Client addresses not capped by max_connections_per_client (proxies or load "
        "balancers in front of the router, which carry many clients).")
    workers: int = setting(
        1, "Router processes serving the port (SO_REUSEPORT); `auto`: one per CPU core. With "
        "more than one, a supervising process owns every model's state (sleep, wake, policy) "
        "and the workers serve ready models directly and ask it for the rest. In the config "
        "file 0 is written `auto`.", kind="workers")
    log_level: str = setting("info", "Router log level.",
                             choices=("debug", "info", "warning", "error"))
    access_log: bool = setting(
        True, "One line per /v1 request in the router's log (method, path, model, status, "
        "bytes, duration, TTFT of streams, request id).")
    state_file: Optional[str] = setting(
        None, "Where the router remembers which models it put to sleep, for engines that "
        "cannot say so themselves (SGLang) after a router restart (default: "
        ".kvrouter-state.json beside the config file).", kind="path")


@dataclass(frozen=True)
class SleepPolicy:
    policy: str = setting(
        "lru", "Which sleep policy decides (README, \"Choosing a sleep policy\"): lru (the "
        "idle threshold, least recently used evicted first), slo (sleeps as much as an SLO "
        "attainment target allows: slo:0.99), adaptive (learns each model's idle gaps), "
        "seed, ttl, ollama, static (never sleeps). lru:T and ttl:T set the idle threshold "
        "to T seconds.", choices=SLEEP_POLICIES, kind="parametrized")
    idle_threshold_seconds: float = setting(
        300.0, "Idle time (since the end of the last request) before a model is put to sleep.",
        min=0)
    check_interval_seconds: float = setting(60.0, "How often the controller checks for idle models.",
                                            min=0.05)
    auto_sleep_enabled: bool = setting(False, "Put idle models to sleep automatically.")
    wakeup_on_request: bool = setting(True, "Wake a sleeping model when a request for it arrives.")
    min_sleep_duration: float = setting(
        60.0, "Minimum time a model stays asleep before a manual or policy wake "
        "(never delays a request).", min=0)
    level: int = setting(1, "vLLM sleep level (1: offload weights to CPU; 2: discard weights).",
                         choices=(1, 2))
    stop_after_seconds: Optional[float] = setting(
        None, "Deep sleep: stop the engine process after this long asleep (none: never).", min=0)
    ttft_slo_ms: Optional[float] = setting(
        None, "The time to first token a request may take, in ms (the SLO it is judged by). "
        "The slo policy counts a request that waited for a wake as late only when the wake "
        "outlasted it or the request's TTFT went past it, so a model whose wake fits within "
        "it sleeps sooner; none: every request that waited for a wake is late.", min=0)
    room_wait_seconds: float = setting(
        30.0, "With gpu_memory_gb: how long a wake that needs room waits for a busy model to "
        "go idle (to evict it) before the requests waiting for the wake get a 503 (0: at "
        "once).", min=0)
    wake_timeout_seconds: float = setting(
        120.0, "Longest a wake may take (plus the engine's startup_timeout_seconds when it "
        "starts a stopped engine): past it the wake is abandoned, the model marked failed and "
        "its engine restarted.", min=0.1)
    sleep_timeout_seconds: float = setting(
        120.0, "Longest the engine may take to go to sleep once drained: past it the model is "
        "marked failed and its engine restarted.", min=0.1)
    gpu_memory_gb: Dict[str, float] = setting(
        factory=dict, help="Memory budget per GPU id, e.g. {\"0\": 80}; empty means no budget.")
    kv_rebalance_seconds: float = setting(
        2.0, "How often each budgeted GPU's memory (gpu_memory_gb) is divided again among the "
        "kvcached KV pools on it, by demand; 0 turns it off.", min=0)


@dataclass(frozen=True)
class InstanceSleep:
    level: Optional[int] = setting(None, "Overrides sleep_manager.level.", choices=(1, 2))
    idle_threshold_seconds: Optional[float] = setting(
        None, "Overrides sleep_manager.idle_threshold_seconds.", min=0)
    pinned: bool = setting(False, "Never put this model to sleep or evict it.")
    stop_after_seconds: Optional[float] = setting(
        None, "Overrides sleep_manager.stop_after_seconds.", min=0)
    ttft_slo_ms: Optional[float] = setting(None, "Overrides sleep_manager.ttft_slo_ms.", min=0)


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = setting(
        "cache_aware", "How requests are spread over a model's replicas (README, \"Replicas\"):"
        " cache_aware (longest cached prompt prefix unless the replicas are imbalanced), "
        "least_outstanding, power_of_two, round_robin, session.", choices=ROUTING_POLICIES)
    min_ready: int = setting(
        1, "Replicas of a model kept awake while it has traffic: the policy sleeps the others "
        "when idle, and the last ones only when the whole model is idle.", min=0)
    wake_at_in_flight: int = setting(
        8, "Requests in flight per ready replica at which another replica of the model is "
        "woken (0: never wake one for load).", min=0)
    session_header: str = setting(
        "x-session-id", "Header naming a session for the session policy (else the body's "
        "`user`).")
    block_tokens: int = setting(
        64, "Prompt tokens (about 4 bytes each) per block of the cache_aware prefix tree.",
        min=1)
    cache_threshold: float = setting(
        0.3, "cache_aware: share of the prompt's blocks a replica must hold to be preferred.",
        min=0, max=1)
    balance_abs_threshold: int = setting(
        64, "cache_aware: the replicas are imbalanced when max - min in flight exceeds this ...",
        min=0)
    balance_rel_threshold: float = setting(
        1.5, "... and max exceeds this times min; then the least loaded gets the request.", min=1)
    max_tree_blocks: int = setting(
        65536, "cache_aware: prompt blocks remembered per replica (least recent dropped).", min=1)
    eject_after_failures: int = setting(
        5, "Consecutive failures (refused connection, 5xx or 429 before any byte) after which a "
        "replica is ejected from routing.", min=1)
    eject_seconds: float = setting(
        30.0, "How long the first ejection lasts (doubling each time, at most 60 s or this); "
        "then one request tries it again.", min=0.1)


@dataclass(frozen=True)
class SimOptions:
    dialect: str = setting("vllm", "Which engine the simulated engine imitates.", choices=DIALECTS)
    ttft_ms: float = setting(30.0, "Base time to first token, in ms (grows with prompt length).",
                             min=0)
    itl_ms: float = setting(20.0, "Inter-token latency at batch size 1, in ms.", min=0)
    startup_seconds: float = setting(1.0, "Simulated model load time before the engine is ready.",
                                     min=0)
    max_concurrency: int = setting(256, "Requests decoded at once; more wait in a queue.", min=1)
    prefill_ms_per_token: float = setting(0.02, "Prefill time per prompt token, in ms.", min=0)
    batch_slowdown: float = setting(
        0.0001, "Extra decode step time per running request, as a fraction of itl_ms.", min=0)
    kv_bytes_per_token: int = setting(
        0, "KV cache bytes per token (0: the size at which kv_cache_gb holds eight sequences "
        "of the maximum length).", min=0)
    wake_bandwidth_gbps: float = setting(
        48.0, "GB/s at which weights are copied to host memory and back (sleep, level-1 "
        "wake); 48 is pinned host->GPU on an H100.", min=0.001)
    wake_overhead_seconds: float = setting(
        0.05, "Fixed time added to every sleep, wake and weights reload.", min=0)
    disk_bandwidth_gbps: float = setting(
        2.0, "GB/s at which weights load from disk (the wake after a level-2 sleep).", min=0.001)
    kv_groups: int = setting(
        1, "KV cache groups (SGLang's hybrid models): with kvcached, one pool segment per "
        "group, <name>_g<N> for N > 0, as kvcached 0.1.6 writes them.", min=1, max=16)


@dataclass(frozen=True)
class Instance:
    name: str = setting(None, "Unique instance name; programs are named engine-<name>.",
                        required=True)
    model: str = setting(None, "Model id or path; clients route by this name.", required=True)
    engine: str = setting(None, "Engine kind.", required=True, choices=ENGINES)
    using_venv: bool = setting(False, "Run the engine with the python of venv_path.")
    venv_path: Optional[str] = setting(None, "Virtual environment holding the engine.", kind="path")
    kvcached_env: Tuple[str, ...] = setting((), "KEY=VALUE kvcached variables for this instance.",
                                            kind="keyvalue")
    engine_env: Tuple[str, ...] = setting((), "KEY=VALUE environment for the engine.",
                                          kind="keyvalue")
    engine_args: Tuple[str, ...] = setting(
        (), "Engine command-line arguments; one item may hold several flags. Must give --port.")
    served_model_names: Tuple[str, ...] = setting(
        (), "More names (aliases) that route to this instance.")
    gpus: Optional[str] = setting(None, "GPU ids for CUDA_VISIBLE_DEVICES: 0, \"0,1\" or [0, 1].",
                                  kind="gpus")
    weights_gb: Optional[float] = setting(None, "GPU memory the weights take, in GB.", min=0)
    kv_cache_gb: Optional[float] = setting(None, "GPU memory budget for the KV cache, in GB.", min=0)
    startup_timeout_seconds: float = setting(
        600.0, "Longest the engine may take to become ready after a start.", min=1)
    sleep: InstanceSleep = setting(factory=InstanceSleep, help="Per-instance sleep policy.")
    sim: SimOptions = setting(
        factory=SimOptions, help="The engine's timing and memory model: what `engine: sim` "
        "imitates, and what `kvrouter simulate` models for every engine.")
    host: Optional[str] = setting(
        None, "The cluster host (a name in cluster.hosts) the engine runs on; routers connect "
        "to that host's address. Required when cluster.hosts is set.")
    replicas: int = setting(
        1, "Short form for N identical replicas of this engine: instances <name>-1 .. <name>-N "
        "on ports --port, --port+1, ...; `gpus` is divided among them in order (\"0,1\" with 2 "
        "replicas: one GPU each), or shared when it names fewer GPUs than replicas.", min=1,
        max=64)
    routing_policy: Optional[str] = setting(
        None, "How requests are spread over this model's replicas (overrides "
        "routing.policy; replicas of one model must agree).", choices=ROUTING_POLICIES)
    min_ready: Optional[int] = setting(
        None, "Replicas of this model kept awake while it has traffic (overrides "
        "routing.min_ready; replicas of one model must agree).", min=0)
    # Derived by the loader from engine_args and the environment keys.
    listen_host: str = derived("localhost")   # the engine's --host
    address: str = derived("")                # where routers connect (its host's address)
    port: int = derived(0)
    argv_args: Tuple[str, ...] = derived(())
    upstream_model: str = derived("")
    route_names: Tuple[str, ...] = derived(())
    # the controller's name for this engine: the model when it is the model's only engine,
    # else the instance's name (one of the model's replicas)
    key: str = derived("")
    replica_of: int = derived(1)      # how many engines serve the model (1: no replicas)
    env: Tuple[Tuple[str, str], ...] = derived(())
    kvcached_enabled: bool = derived(False)
    # The sleep settings in force: this instance's overrides, else sleep_manager's.
    sleep_level: int = derived(1)
    idle_threshold_seconds: float = derived(300.0)
    stop_after_seconds: Optional[float] = derived(None)
    ttft_slo_seconds: Optional[float] = derived(None)

    @property
    def connect_host(self) -> str:
        return self.address or connect_host(self.listen_host)

    @property
    def kvcached_ipc_name(self) -> Optional[str]:
        """The engine's kvcached pool name as kvcached spells it (KVCACHED_IPC_NAME with
        other characters than letters, digits, ``_`` and ``-`` made ``-``), when it is on."""
        raw = dict(self.env).get("KVCACHED_IPC_NAME") if self.kvcached_enabled else None
        return kvpool.ipc_name(raw) if raw else None

    @property
    def kv_pool_path(self) -> Optional[str]:
        """The engine's kvcached pool segment (/dev/shm/<name>), when kvcached is on."""
        ipc = self.kvcached_ipc_name
        return kvpool.segment_path(ipc) if ipc else None

    @property
    def base_url(self) -> str:
        return host_url(self.connect_host, self.port)

    # Process names, spelled here only: the compiler renders them, process control uses them.
    @property
    def program_name(self) -> str:
        """supervisord program. Not in a group: supervisord restarts every program of a
        group whose membership changes, and adding an engine must not touch the others."""
        return f"engine-{self.name}"

    @property
    def supervisor_name(self) -> str:
        return self.program_name

    @property
    def unit_stem(self) -> str:
        """systemd user unit, without ``.service``."""
        return f"kvrouter-engine-{self.name}"

    @property
    def unit_name(self) -> str:
        return f"{self.unit_stem}.service"

    @property
    def known_as(self) -> Tuple[str, ...]:
        """Every name a user may give this instance to a command: the model's route names,
        then the instance's own name and its program's (supervisorctl, systemctl)."""
        return self.route_names + tuple(n for n in (
            self.name, self.program_name, self.unit_stem, self.unit_name)
            if n not in self.route_names)

    @property
    def dialect(self) -> str:
        return self.sim.dialect if self.engine == "sim" else self.engine

    @property
    def timing(self) -> Timing:
        """The engine's timing and memory (its `sim:` block and sizes)."""
        return Timing.of(
            self.sim, max_model_len=DEFAULT_MAX_MODEL_LEN,
            weights_gb=DEFAULT_WEIGHTS_GB if self.weights_gb is None else self.weights_gb,
            kv_cache_gb=DEFAULT_KV_CACHE_GB if self.kv_cache_gb is None else self.kv_cache_gb)


@dataclass(frozen=True)
class BenchClient:
    name: str = setting(None, "Client name; programs are named bench-<name>.", required=True)
    model: str = setting(None, "Model to load.", required=True)
    tool: str = setting("builtin", "Load generator.", choices=BENCH_TOOLS)
    concurrency: Optional[int] = setting(None, "Closed loop: requests in flight at once.", min=1)
    request_rate: Optional[float] = setting(None, "Open loop: requests per second.", min=0.001)
    num_prompts: int = setting(200, "Requests to send.", min=1)
    duration_seconds: Optional[float] = setting(None, "Stop after this long.", min=0.1)
    prompt_tokens: int = setting(128, "Prompt length in tokens.", min=1)
    output_tokens: int = setting(128, "Output length in tokens.", min=1)
    endpoint: str = setting("chat", "API to call.", choices=("chat", "completions"))
    stream: bool = setting(True, "Stream responses (needed for TTFT and ITL).")
    dataset_path: Optional[str] = setting(None, "ShareGPT-format JSON file of prompts.", kind="path")
    venv_path: Optional[str] = setting(None, "Virtual environment of an external tool.", kind="path")
    extra_args: Tuple[str, ...] = setting((), "More arguments for the tool.")

    @property
    def program_name(self) -> str:
        return f"bench-{self.name}"

    @property
    def unit_stem(self) -> str:
        return f"kvrouter-bench-{self.name}"


@dataclass(frozen=True)
class BenchmarkConfig:
    results_dir: str = setting("bench-results", "Where clients write results (relative to the "
                               "config file).", kind="path")
    clients: Tuple[BenchClient, ...] = setting((), "Benchmark clients, one program each.")


@dataclass(frozen=True)
class ClusterHost:
    name: str = setting(None, "Host name: instances name it in `host:`, and `kvrouter render "
                        "CONFIG --host NAME` renders what runs there.", required=True)
    address: str = setting(None, "Address the routers (and the other hosts) reach this host "
                           "at; its engines must listen on it (or on 0.0.0.0).", required=True)
    router: bool = setting(False, "A router runs on this host (`kvrouter serve CONFIG "
                           "--cluster-host NAME`, rendered with the host's programs).")
    router_host: Optional[str] = setting(
        None, "Address this host's router listens on (default: router.router_host).")
    router_port: Optional[int] = setting(
        None, "Port this host's router listens on (default: router.router_port).",
        min=1, max=65535)
    supervisor_port: Optional[int] = setting(
        None, "TCP port of this host's supervisord XML-RPC (inet_http_server on its address, "
        "with cluster.supervisor_username/password): routers on other hosts stop, start and "
        "restart its engines through it (deep sleep). None: only a router on this host can.",
        min=1, max=65535)

    @property
    def supervisor_url(self) -> Optional[str]:
        return host_url(self.address, self.supervisor_port) if self.supervisor_port else None


@dataclass(frozen=True)
class ClusterConfig:
    redis_url: Optional[str] = setting(
        None, "Redis (or Valkey) holding the state the routers share: redis://[:PASSWORD@]"
        "HOST:PORT/DB. None (the default): every router keeps its state in its own process.")
    key_prefix: str = setting(
        "kvrouter", "Prefix of every Redis key and channel (two deployments may share a Redis "
        "with two prefixes).")
    hosts: Tuple[ClusterHost, ...] = setting(
        (), "The machines of the deployment: where engines run and where routers run.")
    leader_lease_seconds: float = setting(
        3.0, "Sleep decisions are made by one router, the holder of a lease of this length "
        "(renewed while it lives); when it dies another takes over within this time.",
        min=0.3, max=600)
    wake_lease_seconds: float = setting(
        5.0, "A router waking or putting a model to sleep holds the model's lease, renewed "
        "while it works; if it dies, another router may take over after this long.",
        min=0.3, max=600)
    heartbeat_seconds: float = setting(
        0.1, "How often each router publishes its requests in flight and last activity per "
        "model (kept in Redis for five heartbeats, at least a second).", min=0.01, max=10)
    supervisor_username: Optional[str] = setting(
        None, "User name of the hosts' supervisord inet_http_server.", kind="secret")
    supervisor_password: Optional[str] = setting(
        None, "Password of the hosts' supervisord inet_http_server.", kind="secret")

    def host(self, name: Optional[str]) -> Optional[ClusterHost]:
        for h in self.hosts:
            if h.name == name:
                return h
        return None

    @property
    def router_hosts(self) -> Tuple[ClusterHost, ...]:
        return tuple(h for h in self.hosts if h.router)


@dataclass(frozen=True)
class Config:
    instances: Tuple[Instance, ...] = setting((), "Engines to run and route to.", required=True)
    router: RouterConfig = setting(factory=RouterConfig, help="Router settings.")
    sleep_manager: SleepPolicy = setting(factory=SleepPolicy, help="Sleep policy for all models.")
    routing: RoutingConfig = setting(
        factory=RoutingConfig, help="Replicas: how requests are spread over the engines that "
        "serve one model, when they are ejected, and when more are woken.")
    kvcached: Dict[str, Any] = setting(
        factory=dict, help="kvcached variables for every instance; keys become upper-case "
        "environment variables (kvcached_log_level -> KVCACHED_LOG_LEVEL).")
    benchmark: BenchmarkConfig = setting(factory=BenchmarkConfig, help="Benchmark clients.")
    process_manager: str = setting("supervisord", "Which process manager `kvrouter` controls.",
                                   choices=PROCESS_MANAGERS)
    launch_delay_seconds: float = setting(0.0, "Delay between starting one engine and the next.",
                                          min=0)
    log_dir: Optional[str] = setting(None, "Folder for supervisord log files (default: "
                                     "<render output>/logs).", kind="path")
    cluster: ClusterConfig = setting(
        factory=ClusterConfig, help="Several hosts and routers (docs/cluster.md). Without it "
        "everything runs on this machine and each router keeps its state in process.")
    # Derived.
    node: Optional[str] = derived(None)   # the cluster host this process acts for
    source: str = derived("")
    base_dir: str = derived(".")
    warnings: Tuple[str, ...] = derived(())
