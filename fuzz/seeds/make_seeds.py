#!/usr/bin/env python3
"""Writes the committed seed corpus of every fuzz target into fuzz/corpus/<target>/ (besides
these, the OTLP targets' corpora hold copies of ingest-api/tests/fixtures/otlp/).

Run it with the OpenTelemetry venv's Python (deploy/local/test-clients.sh makes it), which has
the OTLP protobuf classes:  ~/.cache/tally/otel-venv/bin/python fuzz/seeds/make_seeds.py
The targets' clock stands at 2026-06-01T00:00:00Z, so every seed is dated the day before.
"""
import base64
import json
import os
import struct

from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")
AT = "2026-05-31T12:00:00Z"
AT_S = 1780228800  # AT in seconds
AT_NS = AT_S * 1_000_000_000


def write(target, name, data):
    folder = os.path.join(ROOT, target)
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def events():
    one = lambda t, data, **kw: {"type": t, "occurred_at": AT, "data": data, **kw}
    write("events_json", "command", json.dumps(one("command.executed", {
        "user_id": "u-1", "team_id": "platform", "project_id": "tally", "session_id": "s-1",
        "command_name": "/review", "args": {"pr": 42}, "duration_ms": 1200,
        "status": "success", "context": {"cwd": "/src"}})))
    write("events_json", "batch", json.dumps([
        one("agent.interacted", {"user_id": "u-1", "agent_name": "claude",
            "interaction_type": "chat", "input_tokens": 1200, "output_tokens": 300,
            "duration_ms": 900, "status": "error", "error_message": "overloaded",
            "model": "opus", "cost_usd": 0.12}, id="0190a8f2-6c1e-7a3b-9c4d-5e6f7a8b9c0d"),
        one("agent.interacted", {"user_id": "u-1", "agent_name": "claude",
            "interaction_type": "chat", "duration_ms": 5, "status": "success",
            "metadata": {"model": "haiku", "cost_usd": 0.01}}, schema_version=1),
        one("tool.executed", {"user_id": "u-2", "session_id": "s-2", "tool_name": "Bash",
            "duration_ms": 40, "success": False, "error_message": "exit 1",
            "details": {"command": "cargo test"}}),
        one("session.started", {"session_id": "s-3", "user_id": "u-3", "context": {}}),
        one("session.ended", {"session_id": "s-3", "user_id": "u-3", "commands_executed": 7,
            "agents_used": ["claude"], "productivity_score": 81.5}),
        one("productivity.recorded", {"user_id": "u-3", "metric_type": "error_rate",
            "value": 0.25, "unit": "ratio", "dimensions": {"repo": "tally"}}),
        one("metric.sample", {"name": "queue_depth", "labels": {"host": "ci-1"}, "value": 3,
            "kind": "gauge", "surprise": True}),
    ]))
    write("events_json", "refused", json.dumps([
        one("command.executed", {"user_id": "", "command_name": "x" * 300,
            "duration_ms": -1, "status": "maybe"}),
        {"type": "auth.login_succeeded", "occurred_at": "yesterday", "data": []},
        {"id": 7, "type": 1, "schema_version": 99, "data": {}, "tenant_id": "x"},
    ]))


def otlp():
    metrics = {"resourceMetrics": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "claude-code"}},
            {"key": "team.id", "value": {"stringValue": "platform"}}]},
        "scopeMetrics": [{"scope": {"name": "com.anthropic.claude_code", "version": "1.0"},
            "metrics": [
                {"name": "claude_code.session.count", "sum": {"aggregationTemporality": 1,
                    "isMonotonic": True, "dataPoints": [{"timeUnixNano": str(AT_NS),
                        "asInt": "1", "attributes": [
                            {"key": "session.id", "value": {"stringValue": "s-1"}},
                            {"key": "user.id", "value": {"stringValue": "u-1"}}]}]}},
                {"name": "claude_code.token.usage", "unit": "tokens", "sum": {
                    "aggregationTemporality": 2, "dataPoints": [{"timeUnixNano": str(AT_NS),
                        "asDouble": 1530.0, "attributes": [
                            {"key": "type", "value": {"stringValue": "input"}},
                            {"key": "model", "value": {"stringValue": "opus"}}]}]}},
                {"name": "queue.depth", "gauge": {"dataPoints": [
                    {"timeUnixNano": str(AT_NS), "asInt": "3"}]}},
                {"name": "http.duration", "histogram": {"aggregationTemporality": 2,
                    "dataPoints": [{"timeUnixNano": str(AT_NS), "count": "4", "sum": 2.5,
                        "bucketCounts": ["1", "2", "1"], "explicitBounds": [0.1, 1.0],
                        "min": 0.05, "max": 1.7}]}},
                {"name": "latency", "summary": {"dataPoints": [{"timeUnixNano": str(AT_NS),
                    "count": "10", "sum": 12.0, "quantileValues": [
                        {"quantile": 0.5, "value": 1.0}, {"quantile": 0.99, "value": 3.0}]}]}},
                {"name": "sizes", "exponentialHistogram": {"aggregationTemporality": 2,
                    "dataPoints": [{"timeUnixNano": str(AT_NS), "count": "3", "sum": 9.0,
                        "scale": 2, "zeroCount": "1",
                        "positive": {"offset": 1, "bucketCounts": ["1", "1"]}}]}}]}]}]}
    def attrs(**kw):
        out = []
        for k, v in kw.items():
            key = k.replace("__", ".")
            if isinstance(v, bool):
                out.append({"key": key, "value": {"boolValue": v}})
            elif isinstance(v, int):
                out.append({"key": key, "value": {"intValue": str(v)}})
            elif isinstance(v, float):
                out.append({"key": key, "value": {"doubleValue": v}})
            else:
                out.append({"key": key, "value": {"stringValue": v}})
        return out
    logs = {"resourceLogs": [{
        "resource": {"attributes": attrs(service__name="claude-code")},
        "scopeLogs": [{"scope": {"name": "com.anthropic.claude_code.events"}, "logRecords": [
            {"timeUnixNano": str(AT_NS), "body": {"stringValue": "claude_code.tool_result"},
             "attributes": attrs(event__name="tool_result", tool_name="Edit", success=True,
                                 duration_ms=12, session__id="s-1", user__id="u-1")},
            {"timeUnixNano": str(AT_NS), "body": {"stringValue": "claude_code.api_request"},
             "attributes": attrs(event__name="api_request", model="opus", cost_usd=0.02,
                                 input_tokens=100, output_tokens=20, duration_ms=800,
                                 session__id="s-1", user__id="u-1")},
            {"observedTimeUnixNano": str(AT_NS), "body": {"stringValue": "claude_code.api_error"},
             "attributes": attrs(event__name="api_error", error="overloaded", status_code="529",
                                 model="opus", duration_ms=30000, user__id="u-1")},
            {"timeUnixNano": str(AT_NS), "severityText": "INFO",
             "body": {"kvlistValue": {"values": [{"key": "a", "value": {"arrayValue": {
                 "values": [{"intValue": "1"}, {"bytesValue": "3q2+7w=="}]}}}]}},
             "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174"}]}]}]}
    write("otlp_json", "metrics", json.dumps(metrics))
    write("otlp_json", "logs", json.dumps(logs))
    pb_metrics = json_format.ParseDict(metrics, metrics_service_pb2.ExportMetricsServiceRequest())
    write("otlp_protobuf", "metrics", pb_metrics.SerializeToString())
    # Proto3 JSON spells trace and span ids in base64; OTLP/JSON in hex.
    for r in logs["resourceLogs"][0]["scopeLogs"][0]["logRecords"]:
        for k in ("traceId", "spanId"):
            if k in r:
                r[k] = base64.b64encode(bytes.fromhex(r[k])).decode()
    pb_logs = json_format.ParseDict(logs, logs_service_pb2.ExportLogsServiceRequest())
    write("otlp_protobuf", "logs", pb_logs.SerializeToString())


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(tag, wire, payload):
    key = varint(tag << 3 | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def snappy_literal_block(data):
    """A snappy raw block holding `data` as literals only (valid, if not compressed)."""
    out = bytearray(varint(len(data)))
    for i in range(0, len(data), 65536):
        chunk = data[i:i + 65536]
        n = len(chunk) - 1
        if n < 60:
            out.append(n << 2)
        elif n < 256:
            out += bytes([60 << 2, n])
        else:
            out += bytes([61 << 2]) + struct.pack("<H", n)
        out += chunk
    return bytes(out)


def promrw():
    def label(k, v):
        return field(1, 2, field(1, 2, k.encode()) + field(2, 2, v.encode()))
    def sample(value, ms):
        return field(2, 2, field(1, 1, struct.pack("<d", value)) + field(2, 0, varint(ms)))
    series = [
        label("__name__", "http_requests_total") + label("job", "api") + label("code", "200")
        + sample(1027.0, AT_S * 1000) + sample(1031.0, AT_S * 1000 + 15000),
        label("__name__", "up") + label("instance", "ci-1:9100") + sample(1.0, AT_S * 1000),
        label("__name__", "bad name") + label("9x", "y") + sample(float("nan"), 0),
    ]
    req = b"".join(field(1, 2, s) for s in series)
    write("promrw", "write_request.pb", req)
    write("promrw", "write_request.snappy", snappy_literal_block(req))


def lineproto():
    write("lineproto", "ns", f"build_time,host=ci-1,repo=tally seconds=12.5,ok=t {AT_NS}\n"
          f"queue_depth value=3i {AT_NS}\n"
          f'deploy,env=prod status="done",count=2u {AT_NS}\n')
    write("lineproto", "ms", f"# comment\ncpu,host=a\\ b,region=eu\\,west usage=0.5 {AT_S * 1000}\n"
          f"cpu usage=-1.5e3,idle=F {AT_S * 1000}\n\nbad line\n")
    write("lineproto", "escapes", 'm\\,x,t\\=k=v\\ w f\\ 1="a \\"quoted\\" s",g=1 \n'
          "m f=1 notatime\nm,=x f=1\nm f=\"open\n")


def jwt():
    b64 = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    header = {"alg": "EdDSA", "typ": "JWT", "kid": "fuzz"}
    claims = {"iss": "tally", "aud": "tally-api", "sub": "0190a8f2-6c1e-7a3b-9c4d-5e6f7a8b9c0d",
              "tid": "0190a8f2-6c1e-7a3b-9c4d-000000000001", "role": "developer", "ver": 0,
              "iat": AT_S, "exp": 4102444800, "jti": "0190a8f2-6c1e-7a3b-9c4d-000000000002"}
    sig = base64.urlsafe_b64encode(b"\0" * 64).rstrip(b"=").decode()
    write("jwt", "valid_claims", f"{b64(header)}.{b64(claims)}.{sig}")
    write("jwt", "expired", f"{b64(header)}.{b64({**claims, 'exp': AT_S, 'role': 'owner'})}.{sig}")
    write("jwt", "rs256", f"{b64({'alg': 'RS256', 'kid': 'fuzz'})}.{b64(claims)}.{sig}")
    write("jwt", "none", f"{b64({'alg': 'none'})}.{b64({'aud': ['tally-api']})}.")


def cursor():
    c = lambda s: base64.urlsafe_b64encode(s.encode()).rstrip(b"=").decode()
    write("cursor", "uuid", c("2026-05-31T12:00:00.123456+00:00|0190a8f2-6c1e-7a3b-9c4d-5e6f7a8b9c0d"))
    write("cursor", "text", c("2026-05-31T12:00:00+02:00|session|with|bars"))
    write("cursor", "number", c("0000-01-01T00:30:00+01:00|42"))


def replay_filter():
    """Envelopes as the log holds them: ingest-api's compact object, the outbox relay's (jsonb's
    key order, spaced, `tenant_id` after `data`), and the array form serde_json also reads."""
    tenant, other = "0f00d000-0000-4000-8000-000000000001", "0f00d000-0000-4000-8000-000000000009"
    env = {"id": "0190a8f2-6c1e-7a3b-9c4d-000000000001", "tenant_id": tenant,
           "type": "command.executed", "schema_version": 1, "occurred_at": AT,
           "received_at": AT, "actor": {"user_id": "u-1"}, "source": "api",
           "data": {"user_id": "u-1", "tenant_id": other, "duration_ms": 1200}}
    write("replay_filter", "ingest", json.dumps(env, separators=(",", ":")))
    order = ["id", "data", "type", "actor", "source", "tenant_id", "occurred_at",
             "received_at", "schema_version"]
    write("replay_filter", "outbox", json.dumps({k: env[k] for k in order}))
    write("replay_filter", "array", json.dumps(list(env.values())))


if __name__ == "__main__":
    events()
    otlp()
    promrw()
    lineproto()
    jwt()
    cursor()
    replay_filter()
