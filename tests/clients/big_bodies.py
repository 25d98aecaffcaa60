"""Large bodies against small requests at ingest-api's events door: a small request's latency
alone, then while SENDERS threads (in a process of their own, so that the probe does not
wait for their interpreter) send 9 MB batches of 1 000 events (the last one invalid, so the
door parses and checks them all and appends nothing). Both use the demo tenant's key, so its
rate limit answers some requests 429; a body the in-flight budget cannot take is answered 503
and its connection closed ("reset"). With PROBE_KEY set, the probe sends with that key (another
tenant's: its answers then show whether the senders' tenant takes the budget from others).

    make up && . .tally/demo.env && python3 tests/clients/big_bodies.py [SENDERS] [SECONDS]
"""
import json, os, sys, threading, time, urllib.request, datetime, multiprocessing

url = os.environ["TALLY_INGEST_URL"] + "/v1/events"
key = os.environ["TALLY_INGEST_KEY"]
conc = int(sys.argv[1]) if len(sys.argv) > 1 else 8
secs = float(sys.argv[2]) if len(sys.argv) > 2 else 15

def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()

probe_key = os.environ.get("PROBE_KEY") or key

def post(body, key=key):
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "content-type": "application/json", "x-api-key": key})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError) as e:
        return "reset"

at = now()
big = [{"type": "metric.sample", "occurred_at": at,
        "data": {"name": "flood", "value": 1, "extra": {"blob": "x" * 9000}}} for _ in range(1000)]
big[-1]["occurred_at"] = "not a time"
big = json.dumps(big).encode()
print(f"big body: {len(big)} bytes", flush=True)

def probe(seconds):
    lat, codes = [], {}
    end = time.time() + seconds
    while time.time() < end:
        body = json.dumps({"type": "metric.sample", "occurred_at": now(),
                           "data": {"name": "probe", "value": 1}}).encode()
        t = time.perf_counter()
        c = post(body, probe_key)
        lat.append((time.perf_counter() - t) * 1000)
        codes[c] = codes.get(c, 0) + 1
        time.sleep(0.02)
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
    return f"{len(lat)} probes, p50 {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms, max {lat[-1]:.1f} ms, codes {codes}"

def flood(stop, answered):
    sent = {}
    def send():
        while not stop.is_set():
            c = post(big)
            sent[c] = sent.get(c, 0) + 1
    threads = [threading.Thread(target=send, daemon=True) for _ in range(conc)]
    for t in threads: t.start()
    for t in threads: t.join()
    answered.put(sent)

if __name__ == "__main__":
    print("alone:", probe(secs / 2), flush=True)
    stop, answered = multiprocessing.Event(), multiprocessing.Queue()
    senders = multiprocessing.Process(target=flood, args=(stop, answered))
    senders.start()
    time.sleep(1)
    print(f"with {conc} senders of big bodies:", probe(secs), flush=True)
    stop.set()
    print("big bodies answered:", answered.get(), flush=True)
    senders.join()
