"""Checks what a valid docker-compose.yml can still get wrong, on the file as Compose resolved it
(`config` output, JSON or YAML, on stdin). Prints each problem and exits 1 if there is any.
Called by compose-check.sh; python3's standard library, plus PyYAML for YAML input.
  usage: docker-compose -f FILE config | python3 compose-check.py FILE
"""

import json
import os
import sys
from urllib.parse import urlsplit

COMPLETED = "service_completed_successfully"
HEALTHY = "service_healthy"


def load(text):
    try:
        return json.loads(text)
    except ValueError:
        import yaml  # only for docker-compose 1.x, which has no JSON output

        return yaml.safe_load(text)


def env(service):
    """A service's environment as a dict (Compose may write it as a list of K=V)."""
    e = service.get("environment") or {}
    if isinstance(e, list):
        e = dict(item.split("=", 1) if "=" in item else (item, None) for item in e)
    return {k: ("" if v is None else str(v)) for k, v in e.items()}


def depends_on(service):
    """{dependency: condition}; the short (list) form means service_started."""
    d = service.get("depends_on") or {}
    if isinstance(d, list):
        return {name: "service_started" for name in d}
    return {name: (c or {}).get("condition", "service_started") for name, c in d.items()}


def has_healthcheck(service):
    h = service.get("healthcheck")
    return bool(h) and not h.get("disable") and h.get("test") not in (None, ["NONE"], "NONE")


def runtime_stage(dockerfile):
    """The last stage of a Dockerfile (what the image runs), comments left out."""
    with open(dockerfile) as f:
        lines = [l for l in f if not l.lstrip().startswith("#")]
    starts = [i for i, l in enumerate(lines) if l.upper().startswith("FROM ")]
    return "".join(lines[starts[-1] if starts else 0 :])


def healthcheck_port(name, environment, words):
    """A Tally service's healthcheck must ask a port it listens on: its operations port when
    it has one (the public port refuses probes once senders hold every connection)."""
    listens = {
        k: v.rpartition(":")[2]
        for k, v in environment.items()
        if k in ("TALLY_HTTP_ADDR", "TALLY_OPERATIONS_ADDR") and v
    }
    if not listens:
        return
    want = listens.get("TALLY_OPERATIONS_ADDR") or listens["TALLY_HTTP_ADDR"]
    for word in words:
        if word.startswith(("http://", "https://")):
            port = str(urlsplit(word).port or 80)
            if port != want:
                yield (
                    f"{name}: its healthcheck asks port {port}, not {want} "
                    f"({'TALLY_OPERATIONS_ADDR' if 'TALLY_OPERATIONS_ADDR' in listens else 'TALLY_HTTP_ADDR'})"
                )


def problems(services, root):
    """What is wrong with the resolved services; build contexts are relative to root."""
    one_shot = {d for s in services.values() for d, c in depends_on(s).items() if c == COMPLETED}

    for name, s in sorted(services.items()):
        if name not in one_shot and not has_healthcheck(s):
            yield f"{name}: a long-running service without a healthcheck"
        image = s.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "build" not in s and "@" not in image and (not tag or "latest" in tag):
            yield f"{name}: image {image!r} is not pinned to a version"
        test = (s.get("healthcheck") or {}).get("test") or []
        words = " ".join(test if isinstance(test, list) else [test]).split()
        uses_curl = "curl" in words
        yield from healthcheck_port(name, env(s), words)
        if uses_curl and "build" in s:
            build = s["build"] if isinstance(s["build"], dict) else {"context": s["build"]}
            context = os.path.join(root, build.get("context", "."))
            dockerfile = os.path.join(context, build.get("dockerfile", "Dockerfile"))
            if not os.path.isfile(dockerfile):
                yield f"{name}: builds from {dockerfile}, which does not exist"
            elif "curl" not in runtime_stage(dockerfile):
                yield f"{name}: its healthcheck runs curl, which {dockerfile}'s image lacks"

    if "migrate" not in services:
        yield "no migrate service"
        return
    migrate = services["migrate"]
    if "migrate" not in migrate.get("command", []):
        yield f"migrate: command {migrate.get('command')!r} does not migrate"
    if "migrate" not in one_shot:
        yield "migrate: nothing waits for it to complete"
    db_host = urlsplit(env(migrate).get("TALLY_DATABASE_URL", "")).hostname
    if depends_on(migrate).get(db_host) != HEALTHY:
        yield f"migrate: does not wait for its database ({db_host}) to be healthy"
    for name, s in sorted(services.items()):
        if name != "migrate" and "TALLY_DATABASE_URL" in env(s):
            if depends_on(s).get("migrate") != COMPLETED:
                yield f"{name}: uses the database but does not wait for migrate to complete"

    ingest, query = services.get("ingest-api"), services.get("query-api")
    if not ingest or not query:
        yield "ingest-api or query-api is missing"
        return
    jwks = urlsplit(env(query).get("TALLY_JWKS_URL", ""))
    ingest_port = env(ingest).get("TALLY_HTTP_ADDR", "").rpartition(":")[2]
    if (jwks.hostname, str(jwks.port)) != ("ingest-api", ingest_port):
        yield (
            f"query-api: TALLY_JWKS_URL {jwks.geturl()!r} is not ingest-api's HTTP port "
            f"(ingest-api:{ingest_port}): every person's token would be refused"
        )


def main():
    config = load(sys.stdin.read())
    services = config.get("services") or {}
    path = sys.argv[1]
    found = list(problems(services, os.path.dirname(os.path.abspath(path))))
    name = os.path.basename(path)
    for p in found:
        print(f"{name}: {p}")
    if not found:
        print(
            f"{name}: {len(services)} services; healthchecks and their ports, start order,"
            " JWKS URL and image tags as expected"
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
