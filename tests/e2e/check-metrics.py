#!/usr/bin/env python3
"""Checks a Prometheus scrape of ubd-engine with prometheus_client's own text parser.

usage: check-metrics.py FILE DEVICE MIN_READS MIN_WRITES
Parses FILE (the body of GET /metrics), fails unless it parses, has the families
ubd-engine documents with the types it documents, the device's totals are at least
MIN_READS/MIN_WRITES, per-queue counters add up to the totals, and each latency
histogram's buckets are cumulative and end at its count. Prints a one-line summary.
"""
import sys

from prometheus_client.parser import text_string_to_metric_families

path, device, min_reads, min_writes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
text = open(path).read()
fams = {f.name: f for f in text_string_to_metric_families(text)}


def fail(msg):
    print(f"check-metrics: {msg}", file=sys.stderr)
    sys.exit(1)


want = {
    "ubd_up": "gauge",
    "ubd_device_info": "gauge",
    "ubd_requests": "counter",
    "ubd_queue_requests": "counter",
    "ubd_bytes": "counter",
    "ubd_errors": "counter",
    "ubd_inflight": "gauge",
    "ubd_queue_inflight": "gauge",
    "ubd_request_duration_seconds": "histogram",
    "ubd_queue_request_duration_seconds": "histogram",
}
for name, typ in want.items():
    if name not in fams:
        fail(f"no family {name} (have {sorted(fams)})")
    if fams[name].type != typ:
        fail(f"{name} is a {fams[name].type}, want {typ}")


def value(fam, sample_name, **labels):
    total = 0.0
    found = False
    for s in fams[fam].samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
            found = True
    if not found:
        fail(f"no sample {sample_name}{labels}")
    return total


reads = value("ubd_requests", "ubd_requests_total", device=device, op="read")
writes = value("ubd_requests", "ubd_requests_total", device=device, op="write")
if reads < min_reads or writes < min_writes:
    fail(f"reads {reads} writes {writes}, want at least {min_reads} and {min_writes}")
for op in ("read", "write"):
    t = value("ubd_requests", "ubd_requests_total", device=device, op=op)
    q = value("ubd_queue_requests", "ubd_queue_requests_total", device=device, op=op)
    if t != q:
        fail(f"{op}: total {t} != sum over queues {q}")
rbytes = value("ubd_bytes", "ubd_bytes_total", device=device, op="read")
if reads and rbytes < reads * 512:
    fail(f"{rbytes} bytes read by {reads} reads")
for op in ("read", "write"):
    buckets = [
        (float(s.labels["le"]), s.value)
        for s in fams["ubd_request_duration_seconds"].samples
        if s.name.endswith("_bucket") and s.labels.get("op") == op and s.labels.get("device") == device
    ]
    buckets.sort()
    count = value("ubd_request_duration_seconds", "ubd_request_duration_seconds_count", device=device, op=op)
    if not buckets or buckets[-1][0] != float("inf") or buckets[-1][1] != count:
        fail(f"{op} histogram: +Inf bucket {buckets[-1:]} != count {count}")
    if any(b[1] > c[1] for b, c in zip(buckets, buckets[1:])):
        fail(f"{op} histogram buckets are not cumulative: {buckets}")
    if count < (reads if op == "read" else writes):
        fail(f"{op} histogram count {count} < requests")
print(f"metrics ok: {len(fams)} families, {int(reads)} reads, {int(writes)} writes, {int(rbytes)} bytes read")
