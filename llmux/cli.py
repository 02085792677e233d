"""``llmux serve | check-config | state | move | pull``.

``serve`` owns the root task group: the runtime's actors start in it, Hypercorn
serves inside it, and Hypercorn's exit cancels it, so every actor's cleanup stops
its worker before the process exits. SIGTERM/SIGINT first drains the requests in
progress for up to ``server.shutdown_grace_s`` (``llmux/shutdown.py``).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import attrs

from llmux.actors.devices import DeviceUnavailable
from llmux.auth import KeyStore, load_keys
from llmux.config import Config, ConfigError, is_loopback, load_config, parse_size
from llmux.config_report import format_bytes, render_summary
from llmux.leftovers import StateDirBusy, StateDirLock
from llmux.logging_setup import ENV as LOG_FORMAT_ENV
from llmux.logging_setup import FORMATS, setup_logging
from llmux.model_files import missing_files, render_missing

log = logging.getLogger("llmux")

DEFAULT_CONFIG = "config/llmux.yaml"
FILES_CHECK_S = 5.0  # how long serve waits for its look for missing model files
MAX_HEADER_BYTES = 16 * 1024  # request line + headers; Hypercorn's default, made explicit


def open_server_problem(keys: KeyStore, host: str) -> str | None:
    """Why the server must not start: no keys on an address others can reach."""
    if keys.enabled or is_loopback(host):
        return None
    return (f"refusing to serve {host} without API keys: anyone who can reach it could use "
            "every model. Set server.api_keys_file (or --api-keys FILE), or bind 127.0.0.1.")


async def serve(config: Config, keys: KeyStore) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config as HypercornConfig

    from llmux.http.app import create_app
    from llmux.http.disconnect import Watchers
    from llmux.runtime import Runtime
    from llmux.shutdown import DRAIN_BACKSTOP_S, Drain, RequestGauge, watch_signals

    runtime = Runtime(config, state_dir=config.server.resolved_state_dir())
    hconfig = HypercornConfig()
    host, port = config.server.host, config.server.port
    hconfig.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    # NOTE: on its shutdown trigger Hypercorn closes the listeners (new connections are
    # refused) and waits for the requests in progress, which watch_signals cuts when
    # shutdown_grace_s is over; see llmux/shutdown.py.
    hconfig.graceful_timeout = config.server.shutdown_grace_s + DRAIN_BACKSTOP_S
    hconfig.accesslog = None  # llmux.http.auth logs each request with its key's name
    hconfig.errorlog = logging.getLogger("llmux.hypercorn")
    # NOTE: the bounds on a client that sends slowly or too much, before any llmux code
    # runs. The request line and headers: at most MAX_HEADER_BYTES (else 431/400 and
    # close), and complete within keep_alive_timeout (server.keep_alive_s, counted from
    # the connection's start or its previous response, which is also how long an idle
    # connection stays open). The body: llmux.http.disconnect ends a body that goes
    # silent for server.read_timeout_s. Hypercorn's own read_timeout stays off: it
    # times every read of the connection, also while a long reply streams to a client
    # that sends nothing, and would cut any generation longer than it.
    hconfig.h11_max_incomplete_size = MAX_HEADER_BYTES
    hconfig.keep_alive_timeout = config.server.keep_alive_s
    shutdown = anyio.Event()
    watchers = Watchers()
    gauge = RequestGauge(create_app(runtime, keys, watchers))
    drain = Drain(gauge, config.server.shutdown_grace_s)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_signals, drain, shutdown.set)
        await tg.start(runtime.run)
        log.info("llmux serving %d virtual models on http://%s:%d",
                 len(config.virtual_models), host, port)
        await hypercorn_serve(gauge, hconfig,  # type: ignore[arg-type]
                              shutdown_trigger=shutdown.wait, mode="asgi")
        drain.end()
        watchers.cancel()  # of requests Hypercorn cut without telling the app
        # The runtime's cancellation stops every worker (unload, then SIGTERM and
        # SIGKILL to its process group), each bounded: nothing outlives this block.
        tg.cancel_scope.cancel()
    drain.stopped()


def warn_of_missing_files(config: Config, within_s: float = FILES_CHECK_S) -> None:
    """A warning for each model file that is not here (news, not an error: it may be
    pulled later). The look runs in a daemon thread and the start waits for it at most
    ``within_s``: a network filesystem that hangs must not keep the server from
    serving the models that are elsewhere."""
    done = threading.Event()

    def look() -> None:
        for missing in missing_files(config):
            log.warning("%s", missing.warning(config))
        done.set()

    threading.Thread(target=look, name="llmux-model-files", daemon=True).start()
    if not done.wait(within_s):
        log.warning("the model files were not all found within %g s (a filesystem that "
                    "does not answer?): starting anyway; a model whose files cannot be "
                    "read will fail its load", within_s)


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return 1
    log_format = args.log_format or config.server.log_format
    setup_logging(log_format)
    os.environ[LOG_FORMAT_ENV] = log_format  # the workers log the same way
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    # NOTE: the address it listens on decides who may read /metrics without a key
    config = attrs.evolve(config, server=attrs.evolve(config.server, host=host, port=port))
    keys_file = args.api_keys or config.server.api_keys_file
    try:
        keys = KeyStore(Path(keys_file) if keys_file else None)
    except ConfigError as exc:
        print_problems(str(keys_file), exc)
        return 1
    problem = open_server_problem(keys, host)
    if problem:
        print(f"llmux: {problem}", file=sys.stderr)
        return 2
    try:
        # NOTE: before the port is bound and any worker starts: a second server on
        # this state directory would clobber the first's pid file (llmux.leftovers).
        lock = StateDirLock.take(config.server.resolved_state_dir())
    except StateDirBusy as exc:
        print(f"llmux: {exc}", file=sys.stderr)
        return 1
    with lock:
        return run_server(config, keys)


def run_server(config: Config, keys: KeyStore) -> int:
    """Serve until stopped; an error an operator can fix is one line on stderr."""
    host, port = config.server.host, config.server.port
    warn_of_missing_files(config)
    if keys.enabled:
        log.info("authentication on: %d API keys (%s)", len(keys.keys),
                 ", ".join(k.name for k in keys.keys))
    else:
        log.warning("no API keys configured: serving without authentication, on the "
                    "loopback address %s only", host)
    try:
        anyio.run(serve, config, keys, backend="asyncio")
    except DeviceUnavailable as exc:
        print(f"llmux: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        error = bind_error(group)
        if error is None:
            raise
        print(f"llmux: cannot listen on {host} port {port}: {error.strerror}", file=sys.stderr)
        return 1
    return 0


def bind_error(group: BaseExceptionGroup) -> OSError | None:
    """The error of listening (the port in use, an address not ours) in ``group``."""
    bound: BaseException | None = group.subgroup(
        lambda exc: isinstance(exc, OSError) and exc.errno in (
            errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES))
    while isinstance(bound, BaseExceptionGroup):
        bound = bound.exceptions[0]
    return bound if isinstance(bound, OSError) else None


def print_problems(path: str, exc: ConfigError) -> None:
    print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def load_or_report(path: str) -> Config | None:
    """The config at ``path``, or None once every problem it has is printed: each
    command that needs a config stops on all of them at once, the same way."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print_problems(path, exc)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_or_report(args.file)
    if config is None:
        return 1
    keys_file = config.server.api_keys_file
    keys_here = keys_file is not None and Path(keys_file).exists()
    if keys_file is not None and keys_here:  # serve refuses bad keys
        try:
            load_keys(Path(keys_file))
        except ConfigError as exc:
            print_problems(keys_file, exc)
            return 1
    print(render_summary(config))
    print(render_missing(config))  # a missing file is news, not an invalid config
    if keys_file is not None and not keys_here:
        print(f"API keys file {keys_file} is not here: `llmux serve` refuses to start "
              "without it")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Download the model files the config names (see llmux.pull)."""
    config = load_or_report(args.config)
    if config is None:
        return 1
    from llmux.pull import PullError, pull  # huggingface_hub loads for this command only

    try:
        return pull(config, args.models, reserve_bytes=args.reserve)
    except PullError as exc:
        print(f"llmux pull: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmux pull: interrupted; files already complete are kept", file=sys.stderr)
        return 130


def admin_call(url: str, path: str, api_key: str | None,
               body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON answer of the server at ``url`` to a GET of ``path`` (a POST of
    ``body`` if given), with the admin key if there is one."""
    request = urllib.request.Request(url.rstrip("/") + path)
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=10) as response:
        data: dict[str, Any] = json.load(response)
    return data


def fetch_state(url: str, api_key: str | None) -> dict[str, Any]:
    return admin_call(url, "/admin/state", api_key)


def render_state(state: dict[str, Any], events: int = 20) -> str:
    """``llmux state``'s text: each device's memory, each model's state and counts (its
    last error below it), and the last ``events`` events with their local times."""
    lines = ["devices:"]
    for d in state["devices"]:
        doing = f"  loading {d['loading']}" if d.get("loading") else ""
        waiting = f"  waiting {', '.join(p['model'] for p in d['pending'])}" \
            if d.get("pending") else ""
        lines.append(f"  {d['id']:<8} capacity {format_bytes(d['capacity_bytes']):>9}  "
                     f"used {format_bytes(d['used_bytes']):>9}  "
                     f"reserved {format_bytes(d['reserved_bytes']):>9}  "
                     f"free {format_bytes(d['free_bytes']):>9}{doing}{waiting}")
    lines.append("models:")
    for m in state["models"]:
        lines.append(f"  {m['id']:<28} {m['state']:<10} {m['device']:<7} "
                     f"{format_bytes(m['footprint_bytes']):>9} {m['footprint_source']:<9} "
                     f"pid {m['pid'] or '-':<7} queued {m['queue_depth']} "
                     f"in-flight {m['in_flight']} loads {m['load_count']} "
                     f"requests {m.get('jobs_started', '-')}")
        if m.get("last_error"):
            lines.append(f"  {'':<28} last error: {m['last_error']}")
    spares = state.get("spares") or {}
    if spares.get("enabled"):
        ready = ", ".join(f"pid {r['pid']} ({format_bytes(r['bytes'])})"
                          for r in spares["ready"]) or "none ready"
        lines.append(f"warm spares: {ready}; handed out {spares['handed_out']}, "
                     f"dropped {spares['dropped']}")
    lines.append("recent events:")
    for e in state["events"][-events:]:
        at = time.strftime("%H:%M:%S", time.localtime(e["at"]))
        moved = f"{e['from_state']} -> {e['to_state']}: " if e["to_state"] else ""
        lines.append(f"  {at} {e['model']:<28} {e['kind']:<10} {moved}{e['reason']}")
    return "\n".join(lines)


def cmd_state(args: argparse.Namespace) -> int:
    try:
        state = fetch_state(args.url, args.api_key)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"cannot read state from {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(state, indent=2) if args.json else render_state(state))
    return 0


def physical_for(state: dict[str, Any], name: str) -> str:
    """The physical model a virtual ``name`` runs on, as the state dump maps them;
    ``name`` itself if none does (a physical name, or one the server will refuse)."""
    for model in state["models"]:
        if name in model.get("virtual_models", ()):
            return str(model["id"])
    return name


def cmd_move(args: argparse.Namespace) -> int:
    """Reload a model on another device through the admin API."""
    try:
        model = args.model
        if "/" in model:
            # NOTE: the admin route takes the model as one path segment, and a server
            # decodes %2F before routing: a virtual name holding "/" is sent as its
            # physical model's (physical names may not hold "/").
            model = physical_for(fetch_state(args.url, args.api_key), model)
        admin_call(args.url, f"/admin/models/{urllib.parse.quote(model, safe='')}/device",
                   args.api_key, {"device": args.device})
    except urllib.error.HTTPError as exc:
        print(f"llmux: {error_message(exc)}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.model}: moving to {args.device}; `llmux state` shows when it is ready")
    return 0


def error_message(exc: urllib.error.HTTPError) -> str:
    """The message of llmux's OpenAI-shaped error body; the status's reason for any other
    body (a proxy's HTML page)."""
    try:
        message = json.loads(exc.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return f"{exc.code} {exc.reason}"
    return str(message)


def port_number(text: str) -> int:
    """A TCP port, for argparse (which names the option in its error)."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to 65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmux", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the server")
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="the config file, as check-config takes it (or --config; default "
                        f"$LLMUX_CONFIG, else {DEFAULT_CONFIG})")
    p.add_argument("--config", dest="config_option", metavar="CONFIG",
                   help="the config file, named this way instead")
    p.add_argument("--host", help="address to listen on (overrides server.host)")
    p.add_argument("--port", type=port_number,
                   help="port to listen on (overrides server.port)")
    p.add_argument("--api-keys", metavar="FILE",
                   help="API keys file (overrides server.api_keys_file)")
    p.add_argument("--log-format", choices=FORMATS,
                   help="text (default) or json: one object a line (overrides "
                        "server.log_format)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("check-config", help="validate a config file and summarise it")
    p.add_argument("file", help="the config file")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("state", help="print a running server's state")
    _server_options(p)
    p.add_argument("--json", action="store_true", help="the state as /admin/state gives it")
    p.set_defaults(func=cmd_state)
    p = sub.add_parser("move", help="reload a model on another device (cpu, cuda:N)")
    p.add_argument("model", help="a physical or virtual model")
    p.add_argument("device", help="a device of the config: cpu, cuda:0 ...")
    _server_options(p)
    p.set_defaults(func=cmd_move)
    p = sub.add_parser("pull", help="download the model files a config names")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="physical or virtual models (default: every model with a source)")
    p.add_argument("--config", default=os.environ.get("LLMUX_CONFIG", DEFAULT_CONFIG),
                   help=f"the config file (default $LLMUX_CONFIG, else {DEFAULT_CONFIG})")
    p.add_argument("--reserve", type=parse_size, default=0, metavar="SIZE",
                   help="disk space to leave free, e.g. 20GB (default 0)")
    p.set_defaults(func=cmd_pull)
    return parser


def _server_options(p: argparse.ArgumentParser) -> None:
    """Where the running server is, and the admin key it asks for."""
    p.add_argument("--url", default=os.environ.get("LLMUX_URL", "http://127.0.0.1:8081"),
                   help="the server (default $LLMUX_URL, else http://127.0.0.1:8081)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("LLMUX_API_KEY"),
                   help="an admin key, if the server has keys; $LLMUX_API_KEY keeps it out "
                        "of the process list")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with serve's config file taken from its argument, --config,
    $LLMUX_CONFIG or the default, in that order (both forms at once is an error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        if args.config and args.config_option:
            parser.error("serve: name the config file once, as CONFIG or --config")
        args.config = (args.config or args.config_option
                       or os.environ.get("LLMUX_CONFIG", DEFAULT_CONFIG))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(getattr(args, "log_format", None) or "text")
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
