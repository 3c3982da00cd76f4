"""The scale-from-zero poller at cluster size: detection-to-scale latency, CPU, and API load.

    .venv/bin/python bench/scale_from_zero.py [--seconds 60] [--interval 0.1]

A fake API server (tests/k8s_fake.py, its own process) holds 1000
VariantAutoscalings across 100 InferencePools, each pool with its own EPP on a
loopback address.  10 variants sit at zero replicas; their queues go above zero
at random times.  A poller-only ``twistd -n llamad`` watches it all.  Reports:
- latency from the queue going up (in the fake) to the scale PUT arriving, p50/p99,
  and llamad's own detection histogram (first scrape that saw it -> PUT acknowledged);
- the poller's CPU seconds per minute (``/proc``), and API requests per second;
- list calls after the first sync (the target is none: watches only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from llamad.supervisor import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOLS, PER_POOL, INACTIVE = 100, 10, 10


def objects(epp_port: int) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for p in range(POOLS):
        ns, pool, epp = f"team-{p % 10}", f"pool-{p}", f"epp-{p}"
        out.append(("apis/inference.networking.k8s.io/v1/inferencepools", {
            "metadata": {"name": pool, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"pool": pool}}, "targetPorts": [{"number": 8000}],
                     "endpointPickerRef": {"name": epp, "port": {"number": 9002}}}}))
        out.append(("api/v1/services", {"metadata": {"name": epp, "namespace": ns}, "spec": {
            "ports": [{"name": "grpc-ext-proc", "port": 9002}, {"name": "http-metrics", "port": epp_port}]}}))
        out.append(("apis/discovery.k8s.io/v1/endpointslices", {
            "metadata": {"name": f"{epp}-1", "namespace": ns, "labels": {"kubernetes.io/service-name": epp}},
            "addressType": "IPv4", "endpoints": [{"addresses": [epp_ip(p)], "conditions": {"ready": True}}]}))
        for v in range(PER_POOL):
            name = f"m{p}-{v}"
            labels = {"pool": pool, "variant": name}
            inactive = p % (POOLS // INACTIVE) == 0 and v == 0
            out.append(("apis/apps/v1/deployments", {"metadata": {"name": name, "namespace": ns}, "spec": {
                "replicas": 0 if inactive else 1, "template": {"metadata": {"labels": labels}}}}))
            out.append(("apis/llmd.ai/v1alpha1/variantautoscalings", {
                "metadata": {"name": name, "namespace": ns, "labels": {"inference.optimization/acceleratorName": "L4"}},
                "spec": {"scaleTargetRef": {"kind": "Deployment", "name": name}, "modelID": f"model-{name}"}}))
    return out


def epp_ip(p: int) -> str:
    return f"127.0.1.{p + 1}"


def call(url: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as r:
        return json.loads(r.read())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    ips = ",".join(epp_ip(p) for p in range(POOLS))
    fake = subprocess.Popen([sys.executable, str(ROOT / "tests" / "k8s_fake.py"), "--epps", ips],
                            stdout=subprocess.PIPE)
    work = Path(tempfile.mkdtemp(prefix="llamad-sfz-bench-"))
    poller = None
    try:
        ports = json.loads(fake.stdout.readline())
        api = ports["api"]
        call(api + "/_fake/objects", {"objects": objects(ports["epp_port"])})
        (work / "kubeconfig").write_text(
            "current-context: c\nclusters:\n- name: k\n  cluster: {server: 'https://unused.invalid'}\n"
            "contexts:\n- name: c\n  context: {cluster: k, user: u}\n"
            "users:\n- name: u\n  user: {token: secret-token}\n")
        (work / "llamad.toml").write_text(
            f'data_dir = "{work}"\n[backend]\nkind = "none"\n[scale_from_zero]\nenabled = true\n'
            f'interval = {args.interval}\napi_server = "{api}"\nkubeconfig = "{work / "kubeconfig"}"\n')
        api_port, health_port = free_port(), free_port()
        env = {**os.environ, "PORT": str(api_port), "PORT_HEALTH": str(health_port)}
        with open(work / "twistd.log", "wb") as log:
            poller = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "llamad", "--config",
                                       str(work / "llamad.toml")], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or poller.poll() is not None:
                raise SystemExit(f"the poller did not sync; see {work / 'twistd.log'}")
            time.sleep(0.1)

        synced = call(api + "/_fake/state")
        requests_at_sync = len(synced["requests"])
        cpu_start, t_start = cpu_seconds(poller.pid), time.monotonic()
        inactive = [(p, f"m{p}-0") for p in range(0, POOLS, POOLS // INACTIVE)]
        flips = sorted((rng.uniform(0.1, 0.9) * args.seconds, p, name) for p, name in inactive)
        for at, p, name in flips:
            time.sleep(max(0.0, t_start + at - time.monotonic()))
            call(api + "/_fake/queue", {"model": f"model-{name}", "size": rng.randint(1, 5), "ips": [epp_ip(p)]})
        time.sleep(max(0.0, t_start + args.seconds - time.monotonic()))
        elapsed = time.monotonic() - t_start
        cpu = cpu_seconds(poller.pid) - cpu_start
        state = call(api + "/_fake/state")
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
    finally:
        if poller is not None:
            poller.send_signal(signal.SIGTERM)
            poller.wait(30)
        fake.terminate()
        fake.wait(10)

    puts = {path.split("/")[-2]: t for t, method, path in state["writes"] if method == "PUT"}
    latencies = [puts[name] - state["flips"][f"model-{name}"] for _, name in inactive if name in puts]
    later = state["requests"][requests_at_sync:]
    lists = [p for m, p in later if m == "GET" and not p.endswith(("?watch", "/scale"))]
    detection: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name.startswith("llamad_scale_from_zero_detection_seconds") or s.name.endswith("passes_total"):
                detection[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
    passes = detection.get("llamad_scale_from_zero_passes_total{}", 0)
    print(f"scale from zero: {POOLS * PER_POOL} VariantAutoscalings, {POOLS} pools, {INACTIVE} inactive; "
          f"interval {args.interval} s; {elapsed:.0f} s")
    print(f"  scaled {len(latencies)}/{INACTIVE}; PUT writes {sum(1 for w in state['writes'] if w[1] == 'PUT')}")
    if latencies:
        print(f"  queue up -> scale PUT: p50 {statistics.median(latencies) * 1000:.0f} ms, "
              f"p99 {pct(latencies, 0.99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms (target p99 <= 150 ms)")
    count = detection.get("llamad_scale_from_zero_detection_seconds_count{}", 0)
    if count:
        mean = detection["llamad_scale_from_zero_detection_seconds_sum{}"] / count
        print(f"  llamad detection (seen -> PUT acknowledged): mean {mean * 1000:.1f} ms over {count:.0f}")
    print(f"  poller CPU: {cpu / elapsed * 60:.2f} s per minute ({cpu / elapsed * 100:.1f} % of one core; "
          f"target <= 10 %); {passes:.0f} passes")
    print(f"  API requests: {len(later) / elapsed:.2f}/s; list calls after sync: {len(lists)} (target 0)")
    scrapes = sum(state["scrapes"].values())
    print(f"  EPP scrapes: {scrapes / elapsed:.1f}/s (once per endpoint per pass)")


if __name__ == "__main__":
    main()
