"""The `tollway` command line: check, render, up, serve, spend, usage, explain, keys,
mock-provider."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from tollway import __version__
from tollway.cli_common import CliError, manifest_path, run_async
from tollway.keys import KeyStore, StoreUnavailable
from tollway.manifest import Manifest, ManifestError, load
from tollway.refs import UnresolvedReference, private_files

DURATION = re.compile(r"^(\d+)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _duration(text: str) -> timedelta:
    if text.strip() == "0":  # no time at all needs no unit (rotate --grace 0)
        return timedelta(0)
    m = DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 12h or 90d")
    return timedelta(seconds=int(m.group(1)) * UNITS[m.group(2)])


def _manifest(args: argparse.Namespace, *, serving: bool = False) -> Manifest:
    """The manifest; `serving`: for a process that reloads it, whose reloads then read and
    compile only the organizations that changed."""
    if serving:
        from tollway.manifest.beside import load_here

        return load_here(manifest_path(args))
    return load(manifest_path(args))


def cmd_check(args: argparse.Namespace) -> int:
    m = _manifest(args)
    keys = len(m.bindings)
    print(f"{m.source}: OK ({len(m.providers)} providers, {len(m.routes)} routes, "
          f"{len(m.organizations)} organizations, {keys} keys)")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from tollway.render import render_yaml, write_config

    m = _manifest(args, serving=args.watch)
    if args.target != "envoy":
        return _render_istio(m, args)
    if args.dir:
        from tollway.envoy_files import follow, write_dynamic

        print(f"wrote {write_dynamic(m, Path(args.dir))} and the files it watches",
              file=sys.stderr)
        if args.watch:
            logging.basicConfig(level=logging.INFO,
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            follow(manifest_path(args), m, Path(args.dir), stop)
        return 0
    if args.watch:
        raise CliError("--watch needs --dir (a running Envoy follows only the files there)")
    if args.output:
        for path in write_config(m, Path(args.output)):
            print(f"wrote {path}", file=sys.stderr)
    elif m.services.tls:
        raise CliError("services.tls: use --output FILE (Envoy reads its certificates through "
                       "files written beside it)")
    else:
        sys.stdout.write(render_yaml(m))
    return 0


def _render_istio(m: Manifest, args: argparse.Namespace) -> int:
    from tollway import istio

    try:
        if args.target == "istio-mesh":
            doc: Any = {"meshConfig": istio.mesh_config(m)} if args.wrap else \
                istio.mesh_config(m)
            sys.stdout.write(yaml.safe_dump(doc, sort_keys=False, width=100))
            return 0
        selector = dict(pair.split("=", 1) for pair in args.istio_selector.split(","))
        objects = istio.objects(m, host=args.istio_host, port=args.istio_port,
                                target_port=args.istio_target_port, selector=selector,
                                namespace=args.istio_namespace)
    except ValueError as e:
        raise CliError(str(e)) from None
    sys.stdout.write(f"# Rendered by `tollway render --target istio` from {m.source}.\n"
                     + yaml.safe_dump_all(objects, sort_keys=False, width=100))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tollway.serve import SERVICE_NAMES, run

    names = args.services.split(",")
    for n in names:
        if n not in SERVICE_NAMES:
            raise CliError(f"unknown service {n!r}: choose from {', '.join(SERVICE_NAMES)}")
    # a bad manifest is refused with its own message before anything starts
    m = _manifest(args, serving=True)
    metrics = None
    if args.metrics:
        host, _, port = args.metrics.rpartition(":")
        if not port.isdigit() or not host:
            raise CliError(f"--metrics {args.metrics!r}: use HOST:PORT, e.g. 0.0.0.0:9464")
        metrics = (host.strip("[]"), int(port))
    return run(manifest_path(args), names, metrics, args.worker, manifest=m)


def cmd_up(args: argparse.Namespace) -> int:
    from tollway.up import up

    return up(manifest_path(args), _manifest(args, serving=True))


def _period(text: str, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """`2026-11` (a calendar month) or `2026-11-22` (a day), in the manifest's time zone."""
    try:
        if len(text) == 7:
            start = datetime.strptime(text, "%Y-%m").replace(tzinfo=tz)
            end = start.replace(year=start.year + start.month // 12,
                                month=start.month % 12 + 1)
        else:
            start = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=tz)
            end = start + timedelta(days=1)
    except ValueError:
        raise CliError(f"period {text!r}: use YYYY-MM or YYYY-MM-DD") from None
    return start, end


def cmd_spend(args: argparse.Namespace) -> int:
    from costsink.ledger import open_ledger
    from costsink.report import GROUPS, render, summarize

    m = _manifest(args)
    if args.rebuild:
        return _rebuild_spend(m)
    tz = ZoneInfo(m.gateway.timezone)
    by = args.by.split(",")
    for g in by:
        if g not in GROUPS:
            raise CliError(f"cannot group by {g!r}: choose from {', '.join(GROUPS)}")
    since, until = _period(args.period or datetime.now(tz).strftime("%Y-%m"), tz)

    async def go() -> list[Any]:
        ledger = open_ledger(m.storage.ledger)
        await ledger.open()
        try:
            return await ledger.rows(since, until)
        finally:
            await ledger.close()
    lines = summarize(run_async(go()), by, tz)
    currency = m.rate_card.currency if m.rate_card else "USD"
    print(render(lines, by, args.format, currency))
    return 0


def _rebuild_spend(m: Manifest) -> int:
    """Set this day's and month's spend counters in the counter store to the ledger's sums.
    Costsink does this by itself when Redis has lost its data; this is for an operator who
    knows the counters are wrong. Exact while no costsink commits at the same moment."""
    from costsink.ledger import open_ledger
    from costsink.spend import SpendRecorder
    from tollway.spend import open_spend_store

    store = open_spend_store(m.storage.counters)
    if store.shared_in_process:
        raise CliError("storage.counters is 'memory': the counters live in `tollway serve`, "
                       "which rebuilds them from the ledger each time it starts")

    async def go() -> int:
        ledger = open_ledger(m.storage.ledger)
        await ledger.open()
        try:
            return await SpendRecorder(store).rebuild(m, ledger, datetime.now(UTC))
        finally:
            await ledger.close()
            await store.close()
    n = run_async(go())
    print(f"spend rebuilt from the ledger: {n} counters of this day and month")
    return 0


def _in(seconds: float) -> str:
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


async def _is_runtime_key(m: Manifest, key_id: str) -> bool:
    from tollway.cli_admin import with_store

    async def look(store: KeyStore) -> int:
        record = await store.get(key_id)
        return int(record is not None and record.spec is not None)
    try:
        return bool(await with_store(m.storage, look))
    except StoreUnavailable:
        return False


def cmd_usage(args: argparse.Namespace) -> int:
    """Asks the running rate-limit service: it holds the counters."""
    import grpc
    from google.protobuf import json_format

    from tollway._proto import usage_pb2, usage_pb2_grpc
    from tollway.tls import blocking_channel, target

    m = _manifest(args)
    # what the manifest can answer is answered here, not blamed on the service
    if args.key_id not in m.bindings and not run_async(_is_runtime_key(m, args.key_id)):
        raise CliError(f"no key {args.key_id!r} in {m.source} nor among the runtime keys: "
                       "`tollway keys list` shows them")
    if args.model and not any(p.model(args.model) for p in m.providers):
        models = sorted({x.name for p in m.providers for x in p.models})
        raise CliError(f"no model {args.model!r} in any provider's catalogue: "
                       f"{', '.join(models)}")
    host, port = m.services.ratelimit
    with blocking_channel(target(host, port), m.services.tls) as channel:
        try:
            r = usage_pb2_grpc.UsageStub(channel).KeyUsage(
                usage_pb2.KeyUsageRequest(key_id=args.key_id, model=args.model or ""),
                timeout=5)
        except grpc.RpcError as e:
            raise CliError(f"usage of {args.key_id}: {e.details()} (is the rate-limit service "
                           f"running at {host}:{port}?)") from None
    if args.format == "json":  # snake_case, like `tollway spend`
        print(json_format.MessageToJson(r, always_print_fields_with_no_presence=True,
                                        preserving_proto_field_name=True))
        return 0
    print(f"key {r.key_id} (org {r.org}, project {r.project}): spent {r.spent_today} "
          f"{r.currency} today, {r.spent_this_month} {r.currency} this month")
    rows = [("scope", "quota", "limit", "models", "used", "remaining", "resets in")]
    for x in r.limits:
        unit = f" {r.currency}" if x.kind == "spend" else ""
        held = x.kind == "spend" and Decimal(x.held) != 0
        used = x.used + (f" (+{x.held} held)" if held else "")
        rows.append((x.scope, x.quota + ("" if x.enforced else " (monitor)"),
                     f"{x.name} {x.limit}{unit}", ",".join(x.models) or "all", used,
                     x.remaining, _in(x.resets_in_seconds)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from tollway.explain import check_ip

    m = _manifest(args)
    try:
        ip = check_ip(args.ip)
    except ValueError as e:
        raise CliError(str(e)) from None
    if not any(p.model(args.model) for p in m.providers):
        print(f"tollway: note: no provider in {m.source} serves model {args.model!r}",
              file=sys.stderr)
    result = run_async(_explain(m, args, ip))
    print(result.as_json() if args.format == "json" else result.text())
    return 0 if result.allowed else 3


async def _explain(m: Manifest, args: argparse.Namespace, ip: str) -> Any:
    """The gateway's own state: the key store (through a mirror, as extauthz reads it), the
    spend counters (Redis; with memory counters, rebuilt from the ledger as a starting
    service does) and the rate-limit service's Usage API."""
    from costsink.ledger import open_ledger
    from costsink.spend import SpendRecorder
    from tollway.explain import explain
    from tollway.keys import open_key_store
    from tollway.keys.mirror import KeyMirror
    from tollway.spend import open_spend_store

    # the key it explains is fetched if the store holds more than this: no need to load them
    mirror = KeyMirror(open_key_store(m.storage.keys), capacity=1000)
    await mirror.store.open()
    spend = open_spend_store(m.storage.counters)
    try:
        await mirror.refresh()
        if spend.shared_in_process:
            ledger = open_ledger(m.storage.ledger)
            try:
                await ledger.open()
                await SpendRecorder(spend, mirror).rebuild(m, ledger, datetime.now(UTC))
                await ledger.close()
            except Exception as e:  # explaining must not need the ledger: say so
                print(f"tollway: cannot read spend from the ledger ({e}); assuming none",
                      file=sys.stderr)
        return await explain(m, mirror, spend, args.key_id, args.model, ip=ip,
                             path=args.path, stream=args.stream, max_tokens=args.max_tokens,
                             body_bytes=args.body_bytes,
                             usage=None if args.no_rate_limits else _usage_lookup(m))
    finally:
        await spend.close()
        await mirror.store.close()


def _usage_lookup(m: Manifest) -> Any:
    from tollway._proto import usage_pb2, usage_pb2_grpc
    from tollway.tls import ServiceChannel, target

    async def lookup(key_id: str, model: str) -> dict[str, Any] | None:
        import grpc
        from google.protobuf import json_format

        channel = ServiceChannel(target(*m.services.dial("ratelimit")), m.services.tls)
        try:
            answer = await usage_pb2_grpc.UsageStub(channel.get()).KeyUsage(
                usage_pb2.KeyUsageRequest(key_id=key_id, model=model), timeout=3)
        except grpc.aio.AioRpcError:
            return None
        finally:
            await channel.get().close()
        result: dict[str, Any] = json_format.MessageToDict(answer,
                                                           preserving_proto_field_name=True)
        return result
    return lookup


def cmd_simulate(args: argparse.Namespace) -> int:
    from tollway.simulate import run

    m = _manifest(args)
    now = datetime.now(UTC)
    since = now - args.since if args.since else None
    report = run_async(run(m, since, None))
    currency = m.rate_card.currency if m.rate_card else ""
    print(report.as_json() if args.format == "json" else report.table(currency))
    return 0


def cmd_mock(args: argparse.Namespace) -> int:
    from tollway import mock_provider

    mock_provider.run(args)
    return 0


def mock_provider_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=8081, help="port to listen on (default 8081)")
    ap.add_argument("--expected-key", default=None,
                    help="refuse requests that do not carry this provider key")
    ap.add_argument("--keep", type=_positive, default=10_000,
                    help="requests held for /_mock/seen and /_mock/bill (default 10,000)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tollway", description="Multi-tenant LLM gateway on Envoy")
    ap.add_argument("--version", action="version", version=f"tollway {__version__}")

    def show_help(_: argparse.Namespace) -> int:  # bare `tollway`: the help, not an error
        ap.print_help()
        return 0
    ap.set_defaults(func=show_help)
    sub = ap.add_subparsers(dest="command")

    def with_manifest(p: argparse.ArgumentParser, required: bool = False) -> None:
        p.add_argument("--manifest", "-m", required=required,
                       help="manifest file (default: $TOLLWAY_MANIFEST)")

    p = sub.add_parser("check", help="validate a manifest",
                       description="Every problem is listed with its path; exit 2 if any.")
    with_manifest(p)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser(
        "render", help="render Envoy's config from a manifest",
        description="Print Envoy's whole config as one static bootstrap, or write the dynamic "
        "layout a running Envoy follows (--dir), and keep it current (--watch).",
        epilog="examples:\n  tollway render -m manifest.yaml > envoy.yaml\n"
        "  tollway render -m manifest.yaml --dir /etc/envoy/tollway --watch",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    with_manifest(p)
    p.add_argument("--output", "-o", help="write the static bootstrap to this file")
    p.add_argument("--dir", help="write the bootstrap (envoy.yaml) and the listener, route and "
                   "cluster files Envoy watches into this directory")
    p.add_argument("--watch", action="store_true",
                   help="with --dir: re-render whenever the manifest changes; routes and "
                   "providers then change on the running Envoy without a restart")
    p.add_argument("--target", choices=["envoy", "istio", "istio-mesh"], default="envoy",
                   help="envoy (default): Tollway's own Envoy; istio: the Gateway, "
                   "VirtualService, AuthorizationPolicy and EnvoyFilter for an Istio ingress "
                   "gateway; istio-mesh: the meshConfig extensionProviders entry they need")
    p.add_argument("--wrap", action="store_true",
                   help="istio-mesh: under a meshConfig key, for an IstioOperator or Helm "
                   "values file")
    p.add_argument("--istio-host", default="*",
                   help="istio: the hostname Tollway answers on the gateway (default: *)")
    p.add_argument("--istio-port", type=int, default=80,
                   help="istio: the Gateway server's port (default: 80)")
    p.add_argument("--istio-target-port", type=int, default=8080,
                   help="istio: the gateway pod's port for it (default: 8080, as Istio's "
                   "default gateway maps 80)")
    p.add_argument("--istio-namespace", default="istio-system",
                   help="istio: the gateway's namespace (default: istio-system)")
    p.add_argument("--istio-selector", default="istio=ingressgateway",
                   help="istio: the gateway pods' labels, k=v[,k=v] "
                   "(default: istio=ingressgateway)")
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("up", help="run the whole gateway locally: Envoy, services, mock provider")
    with_manifest(p)
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("serve", help="run Tollway's gRPC services")
    with_manifest(p)
    p.add_argument("--services", default="extauthz,ratelimit,costsink,admin",
                   help="comma-separated: extauthz,ratelimit,costsink,admin (default: all)")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="where to serve Prometheus metrics (default: 127.0.0.1 and the "
                        "manifest's services.metrics_port); one per process")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("spend", help="spend from the ledger, grouped, for a month or a day")
    with_manifest(p)
    p.add_argument("--period", help="YYYY-MM or YYYY-MM-DD (default: this month)")
    p.add_argument("--by", default="org,project,key,model",
                   help="comma-separated: org,project,key,model,day")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="table (default), csv or json (snake_case, money as exact strings)")
    p.add_argument("--rebuild", action="store_true",
                   help="instead of a report: set this day's and month's spend counters in "
                        "Redis to what the ledger holds")
    p.set_defaults(func=cmd_spend)
    p = sub.add_parser("usage", help="a key's limits, what is left and when each resets")
    with_manifest(p)
    p.add_argument("--key", dest="key_id", required=True, help="the key id")
    p.add_argument("--model", help="only the limits this model counts against")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json (snake_case)")
    p.set_defaults(func=cmd_usage)
    p = sub.add_parser(
        "explain", help="what the gateway would answer a key for a model now, and why "
        "(exit 3: denied)",
        description="Runs extauthz's own steps on the gateway's current state (key store, "
        "spend counters, the rate-limit service's counts) and prints the status and error "
        "code the gateway would answer. The secret is not checked: give the key id.",
        epilog="example:\n  tollway explain -m manifest.yaml --key chat-app-prod --model "
        "gpt-5.4-mini --ip 10.0.0.7",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    with_manifest(p)
    p.add_argument("--key", dest="key_id", required=True, help="the key id")
    p.add_argument("--model", required=True, help="the model the request asks for")
    p.add_argument("--ip", default="127.0.0.1", help="the client address (default 127.0.0.1)")
    p.add_argument("--path", help="the route's path (default: the first route with the model)")
    p.add_argument("--stream", action="store_true", help="a streamed request")
    p.add_argument("--max-tokens", type=int, help="the request's output cap (default: the "
                   "model's)")
    p.add_argument("--body-bytes", type=int, default=1024,
                   help="the request body's size, for the budget hold (default 1024)")
    p.add_argument("--no-rate-limits", action="store_true",
                   help="do not ask the rate-limit service for the key's counts")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="text (default) or json: status, code and steps")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser(
        "simulate", help="what a proposed manifest would have done to the recorded traffic",
        description="Replays the ledger's requests (key, model, route, time, tokens, cost) "
        "against the manifest given, with fresh counters, and reports per project and key "
        "what its allowlists, model rules, rate limits and budgets would now refuse or let "
        "through, and the spend that would have been blocked. Run it on the edited manifest "
        "before applying it.",
        epilog="example:\n  tollway simulate -m manifest-proposed.yaml --since 30d",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    with_manifest(p)
    p.add_argument("--since", type=_duration, default=timedelta(days=30),
                   help="how far back to replay (default 30d)")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="table (default) or json")
    p.set_defaults(func=cmd_simulate)
    p = sub.add_parser("mock-provider", help="run the mock OpenAI/Anthropic provider",
                       description="A provider that speaks OpenAI's and Anthropic's wire "
                                   "formats, for trying Tollway without a real one. Example: "
                                   "tollway mock-provider --port 8081")
    mock_provider_arguments(p)
    p.set_defaults(func=cmd_mock)

    keys = sub.add_parser("keys", help="issue and manage client keys")
    ks = keys.add_subparsers(dest="keys_action", required=True)
    k = ks.add_parser("list", help="every key id in the manifest and the store, in order")
    with_manifest(k)
    k.add_argument("--after", default="", metavar="KEY_ID",
                   help="start after this key id (the last one a --limit listing showed)")
    k.add_argument("--limit", type=_positive, help="at most this many keys (default: all)")
    for name, help_ in (("issue", "issue a secret for a key id (printed once)"),
                        ("show", "a key's state and audit trail"),
                        ("suspend", "refuse a key until it is resumed"),
                        ("resume", "accept a suspended key again"),
                        ("revoke", "refuse a key for good"),
                        ("rotate", "replace a key's secret"),
                        ("expire", "set when a key stops working")):
        k = ks.add_parser(name, help=help_)
        with_manifest(k)
        k.add_argument("key_id", help="the key's id (the part of the key before the dot)")
        if name == "issue":
            k.add_argument("--expires-in", type=_duration, help="e.g. 90d")
        if name == "rotate":
            k.add_argument("--grace", type=_duration, default=timedelta(0),
                           help="how long the old secret keeps working, e.g. 24h (default 0: "
                           "it stops at once)")
        if name == "expire":
            k.add_argument("--in", dest="in_", type=_duration, help="from now (default: now)")
        if name in ("suspend", "resume", "revoke"):
            k.add_argument("--reason", help="recorded in the audit trail")
        k.add_argument("--server", help="work on runtime keys through the admin API at this "
                       "gateway URL (token in $TOLLWAY_ADMIN_TOKEN) instead of the store")
        if name == "issue":
            k.add_argument("--client", help="with --server: the runtime client to issue under")
            k.add_argument("--spec", help="with --server: the key document as JSON (models, "
                           "quotas, plan, metadata)")
    from tollway import cli_admin, cli_keys

    keys.set_defaults(func=cli_keys.cmd_keys)

    cli_admin.add_parsers(sub, with_manifest)
    cli_admin.add_client_parsers(sub)
    for name in ("admin-tokens", "audit", "clients"):
        sub.choices[name].set_defaults(func=_admin_command)
    for name, parser in sub.choices.items():
        if name in EXAMPLES and not parser.epilog:
            parser.epilog = "example:\n  " + EXAMPLES[name]
            parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return ap


# shown under each command's --help that has no longer description of its own
EXAMPLES = {
    "check": "tollway check -m manifest.yaml",
    "up": "tollway up -m examples/quickstart.yaml",
    "serve": "tollway serve -m /etc/tollway/manifest/manifest.yaml --services "
             "extauthz,ratelimit,admin",
    "spend": "tollway spend -m manifest.yaml --period 2026-11 --by project,model "
             "--format csv",
    "usage": "tollway usage -m manifest.yaml --key chat-app-prod --model gpt-5.4-mini",
    "keys": "tollway keys issue -m manifest.yaml chat-app-prod --expires-in 90d\n  "
            "tollway keys rotate -m manifest.yaml chat-app-prod --grace 24h",
    "mock-provider": "tollway mock-provider --port 8081",
}


def _admin_command(args: argparse.Namespace) -> int:
    # `clients` works through the admin API only: it has no manifest
    path = manifest_path(args) if hasattr(args, "manifest") else None
    code: int = args.admin_cmd(args, path)
    return code


def _stdout_gone() -> bool:
    """Whether standard output is a pipe nobody reads any more (poll says POLLERR)."""
    import select

    poll = select.poll()
    try:
        poll.register(sys.stdout.fileno(), select.POLLOUT)
    except (OSError, ValueError):  # no file behind it
        return False
    return any(events & select.POLLERR for _, events in poll.poll(0))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    private_files()
    try:
        code = args.func(args)
    except ManifestError as e:
        print(f"tollway: manifest refused: {e}", file=sys.stderr)
        code = 2
    except BrokenPipeError as e:
        if not _stdout_gone():  # a connection's, not the reader's: an error like another
            print(f"tollway: {e}", file=sys.stderr)
            code = 1
        else:  # the reader went away (`tollway spend | head`): quietly, as other commands
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 141  # 128 + SIGPIPE, what a shell reports for such a command
    except (CliError, UnresolvedReference, StoreUnavailable, OSError) as e:
        print(f"tollway: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
