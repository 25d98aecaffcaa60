"""Sends raw bytes as an OTLP/gRPC Export request with grpcio and prints the status code's name
and details: lets the tests send what no SDK would (garbage, oversized or gzip-bombed messages).

    python otlp_grpc_raw.py --target 127.0.0.1:4317 --key tly_... --signal metrics \
        (--hex 0aff... | --zeros 67108864 | --file body.pb) [--gzip]
"""
import argparse

import grpc

args = argparse.ArgumentParser()
args.add_argument("--target", required=True)
args.add_argument("--key", required=True)
args.add_argument("--signal", choices=["metrics", "logs"], default="metrics")
args.add_argument("--hex", default="")
args.add_argument("--zeros", type=int, default=0)
args.add_argument("--file", help="send this file's bytes (after --hex, before --zeros)")
args.add_argument("--gzip", action="store_true")
args = args.parse_args()

service = {
    "metrics": "opentelemetry.proto.collector.metrics.v1.MetricsService",
    "logs": "opentelemetry.proto.collector.logs.v1.LogsService",
}[args.signal]
body = bytes.fromhex(args.hex)
if args.file:
    with open(args.file, "rb") as f:
        body += f.read()
body += bytes(args.zeros)
with grpc.insecure_channel(args.target) as channel:
    export = channel.unary_unary(f"/{service}/Export")  # bytes in, bytes out
    try:
        answer = export(
            body,
            metadata=[("authorization", f"Bearer {args.key}")],
            compression=grpc.Compression.Gzip if args.gzip else None,
            timeout=30,
        )
        print("OK", answer.hex())
    except grpc.RpcError as e:
        print(e.code().name, e.details())
