"""Sends Claude-Code-shaped OpenTelemetry metrics and events to Tally with the official Python
SDK and its OTLP exporters (HTTP/protobuf: opentelemetry-exporter-otlp-proto-http; HTTP/JSON:
opentelemetry-exporter-otlp-json-http; gRPC: opentelemetry-exporter-otlp-proto-grpc), then
prints, as JSON, the totals a dashboard should show.

The names, attributes and value types follow Claude Code's documented telemetry (see the README,
"Claude Code"): delta counters under the meter `com.anthropic.claude_code`, events as log records
under `com.anthropic.claude_code.events` whose body is `claude_code.<event>`, numeric event
attributes as numbers in one session and as strings (older versions) in the next.

    python claude_code_otel.py --endpoint http://127.0.0.1:8080/v1/otlp --key tk_... \
        --encoding protobuf|json [--gzip] [--sessions 3]
    python claude_code_otel.py --endpoint http://127.0.0.1:4317 --key tk_... --encoding grpc

With --prompts N each session has N prompts (each with its tools, requests and an error), and
--detail adds, per session, what each prompt caused, in order.
"""
import argparse
import json
import logging
import sys
import time
import uuid

from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, UpDownCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

args = argparse.ArgumentParser()
args.add_argument("--endpoint", required=True)
args.add_argument("--key", required=True)
args.add_argument("--encoding", choices=["protobuf", "json", "grpc"], required=True)
args.add_argument("--gzip", action="store_true")
args.add_argument("--sessions", type=int, default=3)
args.add_argument("--prompts", type=int, default=1, help="prompts per session")
args.add_argument("--detail", action="store_true", help="also print what each session sent")
args.add_argument("--prompt-text", default=None,
                  help="send this as each prompt's text (as with OTEL_LOG_USER_PROMPTS=1)")
args = args.parse_args()

logging.basicConfig(stream=sys.stderr, level=logging.WARNING)

if args.encoding == "protobuf":
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    compression = Compression.Gzip if args.gzip else Compression.NoCompression
elif args.encoding == "grpc":
    from grpc import Compression
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    compression = Compression.Gzip if args.gzip else Compression.NoCompression
else:
    from opentelemetry.exporter.otlp.common.http import Compression
    from opentelemetry.exporter.otlp.json.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.json.http.metric_exporter import OTLPMetricExporter

    compression = Compression.GZIP if args.gzip else Compression.NONE

headers = {"authorization": f"Bearer {args.key}"}
grpc = args.encoding == "grpc"
# Over HTTP each signal has its path under the endpoint; gRPC has one address for both.
metrics_endpoint = args.endpoint if grpc else f"{args.endpoint}/v1/metrics"
logs_endpoint = args.endpoint if grpc else f"{args.endpoint}/v1/logs"
transport = {"insecure": True} if grpc else {}
resource = Resource.create(
    {
        "service.name": "claude-code",
        "service.version": "2.1.0",
        "os.type": "linux",
        "host.arch": "amd64",
        "team.id": "platform",
    }
)

delta = {
    Counter: AggregationTemporality.DELTA,
    UpDownCounter: AggregationTemporality.DELTA,
    Histogram: AggregationTemporality.DELTA,
}
metric_exporter = OTLPMetricExporter(
    endpoint=metrics_endpoint,
    headers=headers,
    compression=compression,
    preferred_temporality=delta,
    **transport,
)
reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=3_600_000)
meters = MeterProvider(resource=resource, metric_readers=[reader])
meter = meters.get_meter("com.anthropic.claude_code", "2.1.0")

log_exporter = OTLPLogExporter(
    endpoint=logs_endpoint, headers=headers, compression=compression, **transport
)
loggers = LoggerProvider(resource=resource)
loggers.add_log_record_processor(SimpleLogRecordProcessor(log_exporter))
events = loggers.get_logger("com.anthropic.claude_code.events", "2.1.0")

session_count = meter.create_counter("claude_code.session.count")
lines = meter.create_counter("claude_code.lines_of_code.count")
prs = meter.create_counter("claude_code.pull_request.count")
commits = meter.create_counter("claude_code.commit.count")
cost = meter.create_counter("claude_code.cost.usage", unit="USD")
tokens = meter.create_counter("claude_code.token.usage", unit="tokens")
decisions = meter.create_counter("claude_code.code_edit_tool.decision")
active = meter.create_counter("claude_code.active_time.total", unit="s")

expected = {
    "metrics": {},
    "tokens_by_type": {},
    "tools": 0,
    "tool_errors": 0,
    "agents": 0,
    "agent_errors": 0,
    "input_tokens": 0,
    "output_tokens": 0,
    "cost_usd": 0.0,
    "prompts": 0,
    "sessions": 0,
    # Per session: its user, and per prompt (in order) what it caused.
    "by_session": {},
}


def add(name, value):
    expected["metrics"][name] = expected["metrics"].get(name, 0) + value


run = uuid.uuid4().hex[:8]
for i in range(args.sessions):
    common = {
        "session.id": f"session-{run}-{i}",
        "user.id": f"user-{i % 2}",
        "user.email": f"dev{i % 2}@example.com",
        "organization.id": "org-1",
        "terminal.type": "vscode",
    }
    model = "claude-sonnet-4-5"
    # Older Claude Code versions send numeric event attributes as strings.
    num = (lambda v: str(v)) if i % 2 else (lambda v: v)

    session_count.add(1, {**common, "start_type": "fresh"})
    add("claude_code.session.count", 1)
    expected["sessions"] += 1
    for kind, n in [("input", 1000 + i), ("output", 200 + i), ("cacheRead", 5000), ("cacheCreation", 100)]:
        tokens.add(n, {**common, "type": kind, "model": model, "query_source": "main"})
        add("claude_code.token.usage", n)
        expected["tokens_by_type"][kind] = expected["tokens_by_type"].get(kind, 0) + n
    c = 0.05 * (i + 1)
    cost.add(c, {**common, "model": model, "query_source": "main"})
    add("claude_code.cost.usage", c)
    lines.add(10, {**common, "type": "added", "model": model})
    lines.add(2, {**common, "type": "removed", "model": model})
    add("claude_code.lines_of_code.count", 12)
    commits.add(1, common)
    add("claude_code.commit.count", 1)
    if i == 0:
        prs.add(1, common)
        add("claude_code.pull_request.count", 1)
    decisions.add(1, {**common, "tool_name": "Edit", "decision": "accept", "source": "config", "language": "Rust"})
    add("claude_code.code_edit_tool.decision", 1)
    active.add(30.5, {**common, "type": "user"})
    add("claude_code.active_time.total", 30.5)

    seq = 0
    detail = {"user": common["user.id"], "prompts": []}
    expected["by_session"][common["session.id"]] = detail

    def event(name, attrs, prompt, severity_text="INFO"):
        global seq
        seq += 1
        now = time.time_ns()
        events.emit(
            timestamp=now,
            observed_timestamp=now,
            body=f"claude_code.{name}",
            severity_text=severity_text,
            attributes={
                **common,
                "event.name": name,
                "event.timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now / 1e9)),
                "event.sequence": seq,
                "prompt.id": prompt,
                **attrs,
            },
        )
        # Distinct, rising times within the session.
        time.sleep(0.002)

    for k in range(args.prompts):
        prompt = f"prompt-{run}-{i}" if k == 0 else f"prompt-{run}-{i}-{k}"
        p = {"id": prompt, "length": 42 + k, "tools": 0, "requests": 0, "errors": 0, "cost_usd": 0.0,
             "kinds": []}
        detail["prompts"].append(p)
        text = args.prompt_text if args.prompt_text is not None else "<REDACTED>"
        event("user_prompt", {"prompt_length": num(42 + k), "prompt": text}, prompt)
        p["kinds"].append("prompt")
        expected["prompts"] += 1
        for tool, ok, ms in [("Edit", True, 120), ("Bash", False, 800), ("Read", True, 5)]:
            attrs = {"tool_name": tool, "tool_use_id": f"toolu_{run}_{i}_{k}_{tool}",
                     "success": "true" if ok else "false", "duration_ms": num(ms),
                     "decision_type": "accept", "decision_source": "config",
                     "tool_result_size_bytes": num(512)}
            if not ok:
                attrs["error"] = "Exit code 1"
            event("tool_result", attrs, prompt)
            p["kinds"].append("tool_result")
            p["tools"] += 1
            expected["tools"] += 1
            expected["tool_errors"] += 0 if ok else 1
        event("tool_decision", {"tool_name": "Edit", "decision": "accept", "source": "config"}, prompt)
        p["kinds"].append("tool_decision")
        for req in range(2):
            tin, tout = 1000 + i, 200 + i
            # A later prompt costs more, so that the most expensive ones are known.
            rc = c / 2 * (k + 1)
            event("api_request", {"model": model, "cost_usd": rc, "duration_ms": num(1500 + req),
                                  "input_tokens": num(tin), "output_tokens": num(tout),
                                  "cache_read_tokens": num(2500), "cache_creation_tokens": num(50),
                                  "request_id": f"req_{run}_{i}_{k}_{req}", "query_source": "main"},
                  prompt)
            p["kinds"].append("api_request")
            p["requests"] += 1
            p["cost_usd"] += rc
            expected["agents"] += 1
            expected["input_tokens"] += tin
            expected["output_tokens"] += tout
            expected["cost_usd"] += rc
        event("api_error", {"model": model, "error": "overloaded_error", "status_code": num(529),
                            "duration_ms": num(700), "attempt": num(1),
                            "request_id": f"req_{run}_{i}_{k}_e"},
              prompt, severity_text="ERROR")
        p["kinds"].append("api_error")
        p["requests"] += 1
        p["errors"] += 1
        expected["agents"] += 1
        expected["agent_errors"] += 1

ok = meters.force_flush(timeout_millis=30_000)
loggers.force_flush(timeout_millis=30_000)
meters.shutdown()
loggers.shutdown()
if not ok:
    print("the metrics export did not complete", file=sys.stderr)
    sys.exit(1)
if not args.detail:
    # Session ids differ from run to run; the totals do not.
    expected.pop("by_session")
print(json.dumps(expected))
