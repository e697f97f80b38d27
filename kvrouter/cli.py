"""The ``kvrouter`` command line."""
from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import click

from kvrouter import __version__
from kvrouter.errors import ConfigErrors, KvrouterError

DEFAULT_CONFIG = "etc/kvrouter.yaml"


def _fail(err: Exception) -> None:
    if isinstance(err, ConfigErrors):
        for e in err.errors:
            click.echo(f"Error: {e}", err=True)
    else:
        click.echo(f"Error: {err}", err=True)
    sys.exit(getattr(err, "exit_code", 2))


def _load(path: str, strict: bool = False):
    from kvrouter.config import load_config

    cfg = load_config(path, strict=strict)
    for w in cfg.warnings:
        click.echo(f"Warning: {w}", err=True)
    return cfg


def with_config(fn):
    """CONFIG as an optional positional argument or as ``--config/-c``, the same on every
    command (default ``etc/kvrouter.yaml``)."""

    @functools.wraps(fn)
    def inner(*args, config_pos=None, config_opt=None, **kw):
        if config_pos and config_opt and config_pos != config_opt:
            raise click.UsageError(f"two configs given: {config_pos} and --config {config_opt}")
        return fn(*args, config=config_opt or config_pos or DEFAULT_CONFIG, **kw)

    inner = click.option("--config", "-c", "config_opt", default=None,
                         type=click.Path(dir_okay=False),
                         help=f"The YAML config (also positional; default {DEFAULT_CONFIG}).")(inner)
    return click.argument("config_pos", metavar="[CONFIG]", required=False,
                          type=click.Path(dir_okay=False))(inner)


class _Group(click.Group):
    """Turn user mistakes (KvrouterError) into one ``Error:`` line and exit 2, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KvrouterError as err:
            _fail(err)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvrouter")
def cli():
    """One OpenAI-compatible endpoint in front of many LLM engines."""


@cli.command()
@with_config
@click.option("--strict", is_flag=True, help="Treat warnings (missing venv_path) as errors.")
def validate(config, strict):
    """Check CONFIG and print a summary of its instances."""
    cfg = _load(config, strict)
    for inst in cfg.instances:
        names = ", ".join(inst.route_names)
        where = f" (host {inst.host})" if inst.host else ""
        pool = f"; kvcached pool {inst.kv_pool_path}" if inst.kv_pool_path else ""
        click.echo(f"{inst.name}: {inst.engine} {names} on {inst.base_url}{where}{pool}")
    cl = cfg.cluster
    for h in cl.hosts:
        engines = [i.name for i in cfg.instances if i.host == h.name]
        parts = [f"{len(engines)} engine{'s' if len(engines) > 1 else ''} "
                 f"({', '.join(engines)})" if engines else "no engines"]
        if h.router:
            parts.append("a router")
        if h.supervisor_url:
            parts.append(f"supervisord XML-RPC on {h.supervisor_url}")
        click.echo(f"host {h.name} ({h.address}): {', '.join(parts)}")
    if cl.redis_url:
        from kvrouter.config.cluster import redacted

        click.echo(f"shared state: {redacted(cl.redis_url)} (prefix {cl.key_prefix})")
    click.echo(f"{config}: OK ({len(cfg.instances)} instances, "
               f"{len(cfg.benchmark.clients)} benchmark clients)")


@cli.command()
@with_config
@click.option("--out", "out_dir", default="etc", show_default=True,
              help="Folder for supervisord.conf and systemd/.")
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
@click.option("--apply", is_flag=True,
              help="Then bring the stack to it: start supervisord, or reread+update a running "
              "one; with process_manager: systemd, install the units and daemon-reload. "
              "Engines whose command line changed are drained first, then restarted.")
@click.option("--only", type=click.Choice(["supervisord", "systemd"]), default=None,
              help="Write only these files (leave the others as the last render wrote them).")
@click.option("--host", "host", default=None, metavar="NAME",
              help="Render only what runs on this host of cluster.hosts (its engines, and its "
              "router when it runs one).")
def render(config, out_dir, strict, apply, only, host):
    """Render supervisord and systemd files for CONFIG into --out."""
    from kvrouter import stack
    from kvrouter.config.cluster import on_host
    from kvrouter.render import RenderOptions, compile_config, socket_path, write_files
    from kvrouter.render.compile import private_files

    cfg = on_host(_load(config, strict), host)
    user = None
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        user = "root"
    files = compile_config(cfg, RenderOptions(out_dir=out_dir, user=user))
    out_abs = os.path.abspath(out_dir)
    sock = socket_path(out_abs)
    dirs = [os.path.join(out_abs, "run"), cfg.log_dir or os.path.join(out_abs, "logs"),
            os.path.dirname(sock)]
    if apply and not only:   # a stack under systemd never needs supervisord's files
        only = "systemd" if cfg.process_manager == "systemd" else None
    report = write_files(out_dir, files, extra_dirs=dirs, private=private_files(files),
                         scope=lambda rel: only is None or
                         rel.startswith("systemd/") == (only == "systemd"))
    for rel in report["written"]:
        click.echo(f"wrote {os.path.join(out_dir, rel)}")
    for rel in report["removed"]:
        click.echo(f"removed {os.path.join(out_dir, rel)}")
    if report["unchanged"]:
        click.echo(f"{len(report['unchanged'])} files unchanged in {out_dir}")
    changed = stack.config_changed(cfg.source, os.path.join(out_abs, "run", "config.sha256"))
    if apply and cfg.process_manager == "systemd":
        stack.apply_systemd(cfg, out_abs, report["written"] + report["removed"], changed,
                            click.echo)
    elif apply:
        stack.apply_supervisord(cfg, out_abs, sock, changed, click.echo)


@cli.command()
@with_config
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Listen on this port instead of router.router_port (the seed's --port).")
@click.option("--host", default=None, help="Listen on this address instead of router_host.")
@click.option("--cluster-host", "node", default=None, metavar="NAME",
              help="Be the router of this host of cluster.hosts (needed when several run one).")
def serve(config, port, host, node):
    """Run the router for CONFIG (one process, gevent)."""
    from kvrouter.router.main import serve as run

    shape = _router_shape(node, host, port)
    run(shape(_load(config)), shape)


def _router_shape(node, host, port):
    """The router's view of a config (its cluster host, the listen address of the command
    line), applied again to the config a reload reads."""
    import dataclasses

    from kvrouter.config.cluster import as_router

    def shape(cfg):
        cfg = as_router(cfg, node)
        if port is not None or host is not None:
            cfg = dataclasses.replace(cfg, router=dataclasses.replace(
                cfg.router, router_port=port or cfg.router.router_port,
                router_host=host or cfg.router.router_host))
        return cfg

    return shape


@cli.command(hidden=True)
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--slot", type=int, required=True)
@click.option("--owner-port", type=int, required=True)
@click.option("--shared", "shared_path", required=True)
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
@click.option("--cluster-host", "node", default=None)
@click.option("--listen-fd", type=int, default=None)
def worker(config, slot, owner_port, shared_path, host, port, node, listen_fd):
    """A router worker process (started by `kvrouter serve` when router.workers > 1)."""
    from kvrouter.router.worker import run_worker

    run_worker(_router_shape(node, host, port)(_load(config)), slot, owner_port, shared_path,
               listen_fd)


def _admin(config: str, method: str, path: str, token: Optional[str] = None):
    from kvrouter import admin

    return admin.call(_load(config), method, path, token)


@cli.command()
@with_config
def status(config):
    """A table of every model: state, in flight, idle time, rate, memory."""
    _, sleep = _admin(config, "GET", "/model/sleep/status")
    _, traffic = _admin(config, "GET", "/model/traffic/stats?window=60")
    rows = [("MODEL", "STATE", "SINCE", "IN FLIGHT", "WAITING", "IDLE", "REQ/S (60s)",
             "GPU GB", "KV USED/LIMIT", "LAST WAKE")]
    for name, st in sleep["models"].items():
        model = st.get("replica_of")   # a replica: its figures are under its model's
        t = traffic["models"].get(model, {}).get("replicas", {}).get(name, {}) if model \
            else traffic["models"].get(name, {})
        mem = st["memory"]
        wake = st["last_wake_seconds"]
        pool = st.get("kv_pool") or {}
        kv = "-" if pool.get("limit_bytes") is None else \
            f"{pool['used_bytes'] / 2**30:.2f}/{pool['limit_bytes'] / 2**30:.2f} GiB"
        rows.append((f"{model} [{name}]" if model else name,
                     st["state"] + (f" (L{st['sleep_level']}, {st['sleep_kind']})"
                                          if st["sleep_level"] else ""),
                     f"{st['since_seconds']:.0f}s", str(st["requests_in_flight"]),
                     str(st["waiting_requests"]), f"{t.get('idle_time_seconds', 0):.0f}s",
                     f"{t.get('request_rate', 0):.2f}", f"{mem['resident_gb']:g}", kv,
                     "-" if wake is None else f"{wake:.2f}s"))
    from kvrouter.bench.report import grid

    for line in grid(rows):
        click.echo(line)
    for gpu, m in sleep.get("gpu_memory", {}).items():
        budget = "no budget" if m["budget_gb"] is None else f"budget {m['budget_gb']:g} GB"
        nv = m.get("nvml")
        seen = f"; NVML: {nv['used_bytes'] / 2**30:.1f} of {nv['total_bytes'] / 2**30:.1f} GiB " \
            "used" if nv else ""
        click.echo(f"GPU {gpu}: {m['used_gb']:g} GB resident ({m['source']}), {budget}{seen}")


@cli.command()
@with_config
@click.option("--interval", type=click.FloatRange(0.2), default=2.0, show_default=True,
              help="Seconds between two redraws.")
@click.option("--once", is_flag=True, help="Print the view once and exit.")
def top(config, interval, once):
    """Models and GPUs at a glance, redrawn in the terminal (the dashboard's view)."""
    from kvrouter import top as view

    def fetch():
        code, body = _admin(config, "GET", "/ui/state")
        if code != 200:
            raise KvrouterError(f"/ui/state answered {code}: {body}")
        return body

    try:
        view.run(fetch, once, interval, click.echo)
    except KeyboardInterrupt:
        pass


@cli.command("sleep")
@click.argument("model")
@with_config
@click.option("--level", type=click.IntRange(1, 2), default=None)
@click.option("--token", default=None, help="admin token (default: router.admin_token)")
def sleep_cmd(model, config, level, token):
    """Put MODEL to sleep through the router."""
    from kvrouter.admin import model_path

    path = model_path("/model/sleep", model) + (f"?level={level}" if level else "")
    code, body = _admin(config, "POST", path, token)
    if code != 200:
        raise KvrouterError(body.get("error", {}).get("message", f"HTTP {code}"))
    st = body["status"]
    click.echo(f"{model}: {st['state']} (level {st['sleep_level']}, took "
               f"{st['last_sleep_seconds']:.2f}s)")


@cli.command("wake")
@click.argument("model")
@with_config
@click.option("--token", default=None, help="admin token (default: router.admin_token)")
def wake_cmd(model, config, token):
    """Wake MODEL through the router."""
    from kvrouter.admin import model_path

    code, body = _admin(config, "POST", model_path("/model/wake", model), token)
    if code != 200:
        raise KvrouterError(body.get("error", {}).get("message", f"HTTP {code}"))
    st = body["status"]
    click.echo(f"{model}: {st['state']} (wake took {st['last_wake_seconds']:.2f}s)")


@cli.command("config-reference")
def config_reference():
    """Print every config key with its type, default, limits and meaning (Markdown)."""
    from kvrouter.config.reference import markdown

    click.echo(markdown())


@cli.command("wait-ready")
@with_config
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.option("--out", "out_dir", default="etc", show_default=True,
              help="Where `kvrouter render` wrote supervisord.conf (to report the router "
              "program's state when it is not ready).")
def wait_ready(config, timeout, out_dir):
    """Wait until the router of CONFIG answers and every model is ready."""
    from kvrouter.admin import supervised_router_state
    from kvrouter.admin import wait_ready as wait

    cfg = _load(config)
    click.echo(f"ready: {', '.join(wait(cfg, timeout, lambda: supervised_router_state(cfg, out_dir)))}")


@cli.command("sim-engine", context_settings={"ignore_unknown_options": True,
                                             "allow_extra_args": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sim_engine(args):
    """Run a simulated vLLM or SGLang engine (no GPU). `kvrouter sim-engine --help` for options."""
    from kvrouter.sim.app import serve
    from kvrouter.sim.options import parse_sim_args

    serve(parse_sim_args(list(args)))


@cli.group("kv")
def kv():
    """kvcached KV pools of the config's engines: list them, set a limit (like kvctl)."""


def _pools(cfg):

    for inst in cfg.instances:
        if inst.kv_pool_path:
            yield inst, inst.kv_pool_path


@kv.command("list")
@with_config
def kv_list(config):
    """Each kvcached-enabled model: its pool's limit, used, preallocated and free bytes."""
    from kvrouter import kvpool

    cfg = _load(config)
    rows = [("MODEL", "LIMIT", "USED", "PREALLOC", "FREE", "SEGMENT")]
    for inst, path in _pools(cfg):
        info = kvpool.read_pool(path)
        if info is None:
            rows.append((inst.key, "-", "-", "-", "-", f"{path} (not created yet)"))
            continue
        groups = kvpool.group_paths(path)
        more = f" (+{len(groups) - 1} KV groups: {', '.join(os.path.basename(g) for g in groups[1:])})" \
            if len(groups) > 1 else ""
        rows.append((inst.key, kvpool.human(info.total), kvpool.human(info.used),
                     kvpool.human(info.prealloc), kvpool.human(info.free), path + more))
    if len(rows) == 1:
        raise KvrouterError(f"{config}: no instance has kvcached enabled (ENABLE_KVCACHED)")
    from kvrouter.bench.report import grid

    for line in grid(rows):
        click.echo(line)


@kv.command("limit")
@click.argument("model")
@click.argument("size")
@with_config
def kv_limit(model, size, config):
    """Set MODEL's KV pool limit to SIZE (8G, 512M, bytes); the engine follows it and the
    arbiter keeps it. SIZE `auto` gives the pool back to the arbiter. MODEL is any of its
    names, its instance name or its program name."""
    from kvrouter import admin, kvpool

    cfg = _load(config)
    inst = next((i for i, _ in _pools(cfg) if model == i.key or model in i.known_as[
        len(i.route_names) if i.replica_of > 1 else 0:]), None)
    if inst is None:
        known = ", ".join(i.name for i, _ in _pools(cfg)) or "none"
        raise KvrouterError(f"{model}: not a kvcached-enabled model or instance of {config} "
                            f"(kvcached-enabled: {known})")
    if size.strip().lower() == "auto":
        code, body = admin.call(cfg, "POST", admin.model_path("/model/kv", inst.key) +
                                "?limit=auto")
        if code != 200:
            raise KvrouterError(body.get("error", {}).get("message", f"HTTP {code}"))
        click.echo(f"{inst.key}: {body['message']}")
        return
    try:
        total = kvpool.parse_size(size)
        info = kvpool.set_pool_limit(inst.kv_pool_path or "", total)
    except ValueError as err:
        raise KvrouterError(str(err)) from None
    except FileNotFoundError:
        raise KvrouterError(f"{model}: no kvcached pool at {inst.kv_pool_path} (is the engine "
                            "running with ENABLE_KVCACHED?)") from None
    click.echo(f"{inst.key}: KV limit {kvpool.human(info.total)} (used "
               f"{kvpool.human(info.used)}); the router's arbiter keeps it until "
               f"`kvrouter kv limit {model} auto`")


def _add_simulate():
    from kvrouter.lab import cli as lab_cli

    @cli.command("simulate")
    @with_config
    @lab_cli.options
    def simulate(config, trace_file, names, scale, find_max, target, ttft_slo_scale,
                 tpot_slo_scale, per_model, json_out, out_dir, skip_unknown, plot_out,
                 timing):
        """Replay a trace against CONFIG's engines under each sleep policy, in seconds: no
        process, no socket. Prints SLO attainment, goodput, TTFT, wakes and GPU memory per
        policy (the policies' own code, the simulated engine's timing model)."""
        from kvrouter.control import policies

        lab_cli.simulate(_load(config), trace_file, names or list(policies.POLICIES), scale,
                         find_max, target, ttft_slo_scale, tpot_slo_scale, per_model, json_out,
                         out_dir, plot_out, skip_unknown, timing)


def _add_bench():
    from kvrouter.bench.cli import bench

    @bench.command("start")
    @click.argument("names", nargs=-1)
    @click.option("--out", "out_dir", default="etc", show_default=True,
                  help="The folder `kvrouter render` wrote supervisord.conf to.")
    def bench_start(names, out_dir):
        """Load the rendered benchmark clients into supervisord and start NAMES (all when
        none is named). They stay out of `supervisorctl start all` until this is run."""
        _bench_programs(out_dir, names, start=True)

    @bench.command("stop")
    @click.option("--out", "out_dir", default="etc", show_default=True,
                  help="The folder `kvrouter render` wrote supervisord.conf to.")
    def bench_stop(out_dir):
        """Stop the benchmark clients and unload them from supervisord."""
        _bench_programs(out_dir, (), start=False)

    cli.add_command(bench)


def _bench_programs(out_dir: str, names, start: bool) -> None:
    import shutil

    from kvrouter.control.supervisor import supervisorctl

    out = os.path.abspath(out_dir)
    conf = os.path.join(out, "supervisord.conf")
    rendered = os.path.join(out, "supervisord-bench.conf")
    loaded = os.path.join(out, "run", "bench", "bench.conf")
    if not os.path.exists(conf) or not os.path.exists(rendered):
        raise KvrouterError(f"no rendered supervisord config in {out_dir}: run "
                            "`kvrouter render CONFIG --out DIR --apply` first")

    def ctl(*args: str) -> str:
        res = supervisorctl(conf, *args, check=False)
        text = (res.stdout + res.stderr).strip()
        if res.returncode not in (0,) and "ERROR" in text:
            raise KvrouterError(f"supervisorctl {' '.join(args)}: {text}")
        return text

    if start:
        os.makedirs(os.path.dirname(loaded), exist_ok=True)
        shutil.copyfile(rendered, loaded)
        ctl("update", "bench")
        targets = [n if n.startswith("bench-") else f"bench-{n}" for n in names]
        click.echo(ctl("start", *([f"bench:{t}" for t in targets] or ["bench:*"])))
    else:
        if os.path.exists(loaded):
            click.echo(ctl("stop", "bench:*"))
            os.remove(loaded)
            ctl("update", "bench")
        click.echo("benchmark clients unloaded")


_add_bench()
_add_simulate()


def main() -> None:
    cli(prog_name="kvrouter")


if __name__ == "__main__":
    main()
