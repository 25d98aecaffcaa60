"""Drives an MCP server over Streamable HTTP with the official MCP Python SDK (`mcp`).

Usage: TALLY_MCP_AUTH='Bearer <token>' python mcp_client.py URL < calls.json

TALLY_MCP_MODE chooses the protocol: `auto` (the default: the 2026-07-28 revision where the
server speaks it) or `legacy` (the initialize handshake of 2025-11-25).

stdin holds a JSON array of calls, `[{"tool": "name", "arguments": {...}}, ...]`. The
client connects as the SDK does by default (mode "auto": a `server/discover` probe of the
stateless protocol, then, when the server does not speak it, the initialize handshake), lists
the tools, makes the calls in order and prints one JSON object on stdout:

  {"server": {"name", "version", "protocolVersion"},
   "tools": [{"name", "description", "inputSchema", "outputSchema"}, ...],
   "calls": [{"tool", "isError", "structured", "text", "error"}, ...]}

A call that raises (a JSON-RPC error, or the SDK rejecting the result, e.g. structured
content that does not match the tool's outputSchema) is reported in its "error". If
connecting or initializing fails the output is `{"connect_error": "..."}`, naming any HTTP
error status seen (the SDK itself reports a bare 401 only as "Server returned an error
response"). A failure after the handshake that is not one call's (a tools/list the SDK
rejects, or the overall timeout) is reported in a top-level "error", next to what was
gathered so far. The exit code is 0 either way; the whole run is bounded by TIMEOUT seconds.
"""

import json
import os
import sys

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

TIMEOUT = 30.0


def describe(exc: BaseException, statuses: list[str]) -> str:
    """One line for an exception (task groups' exception groups flattened), plus HTTP errors seen."""
    if isinstance(exc, BaseExceptionGroup):
        text = "; ".join(describe(e, []) for e in exc.exceptions)
    elif isinstance(exc, MCPError):
        text = f"MCPError {exc.code}: {exc.message}"
    elif isinstance(exc, TimeoutError):
        text = f"TimeoutError: no answer within {TIMEOUT:g} s"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text + "".join(f" [{s}]" for s in statuses)


async def run(url: str, calls: list[dict], out: dict) -> None:
    statuses: list[str] = []  # HTTP error statuses of POSTs since the last step began

    async def on_response(response: httpx2.Response) -> None:
        if response.status_code >= 400 and response.request.method == "POST":
            statuses.append(f"HTTP {response.status_code}")

    headers = {"Authorization": os.environ["TALLY_MCP_AUTH"]} if os.environ.get("TALLY_MCP_AUTH") else {}
    async with httpx2.AsyncClient(
        headers=headers, timeout=TIMEOUT, trust_env=False, event_hooks={"response": [on_response]}
    ) as http:
        client = Client(
            streamable_http_client(url, http_client=http),
            mode=os.environ.get("TALLY_MCP_MODE", "auto"),
            read_timeout_seconds=TIMEOUT,
            cache=None,
        )
        try:
            await client.__aenter__()
        except Exception as exc:  # boundary: any failure to connect is the answer
            out["connect_error"] = describe(exc, statuses)
            return
        try:
            info = client.server_info
            out["server"] = {
                "name": info.name if info else None,
                "version": info.version if info else None,
                "protocolVersion": client.protocol_version,
            }
            out["tools"], cursor = [], None
            while True:
                page = await client.list_tools(cursor=cursor)
                out["tools"] += [
                    {"name": t.name, "description": t.description, "inputSchema": t.input_schema,
                     "outputSchema": t.output_schema}
                    for t in page.tools
                ]
                if (cursor := page.next_cursor) is None:
                    break
            out["calls"] = []
            for call in calls:
                entry = {"tool": call["tool"], "isError": None, "structured": None, "text": None, "error": None}
                out["calls"].append(entry)
                statuses.clear()
                try:
                    result = await client.call_tool(call["tool"], call.get("arguments"))
                except Exception as exc:  # boundary: a failed call is reported, not fatal
                    entry["error"] = describe(exc, statuses)
                    continue
                entry["isError"] = result.is_error
                entry["structured"] = result.structured_content
                entry["text"] = "".join(c.text for c in result.content if c.type == "text")
        finally:
            await client.__aexit__(None, None, None)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: TALLY_MCP_AUTH='Bearer ...' {sys.argv[0]} URL < calls.json")
    stdin = sys.stdin.read().strip()
    calls = json.loads(stdin) if stdin else []
    out: dict = {}

    async def bounded() -> None:
        with anyio.fail_after(TIMEOUT):
            await run(sys.argv[1], calls, out)

    try:
        anyio.run(bounded)
    except Exception as exc:  # the overall timeout, or a failure past the handshake
        out.setdefault("connect_error" if "server" not in out else "error", describe(exc, []))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
