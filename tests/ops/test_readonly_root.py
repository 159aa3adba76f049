"""The pods' read-only root filesystem, emulated: `helios serve` in a private mount namespace whose
root is remounted read-only, with tmpfs exactly where the manifests mount their emptyDirs. It
serves a completion, so the volumes the manifests give are all the writing it needs."""
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from cluster.k8s import WRITABLE
from tests.cluster.conftest import free_port

pytestmark = pytest.mark.slow
HOME_IN_IMAGE = "/home/ray"


def _can_remount_read_only() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -o remount,ro,bind / / && ! touch /.rw-probe"],
                           capture_output=True)
    return probe.returncode == 0


def test_the_cluster_serves_with_the_root_read_only(smollm2, redis_url, tmp_path):
    if not _can_remount_read_only():
        pytest.skip("needs a private mount namespace (root, unshare -m)")
    home = os.path.expanduser("~")
    writable = [p.replace(HOME_IN_IMAGE, home, 1) for p in WRITABLE.values()]
    port = free_port()
    config = tmp_path / "cluster.yaml"  # tmp_path lies under /tmp: a tmpfs hides it, so it is read first
    config.write_text(json.dumps({"port": port, "metrics_port": free_port(), "candidates": [
        {"name": "smollm2", "engine": {"model": "smollm2", "home": str(smollm2.home)}}]}))
    script = textwrap.dedent(f"""\
        config="$(cat {config})"
        mount -o remount,ro,bind / / || exit 3
        for d in {' '.join(writable)}; do mkdir -p "$d" 2>/dev/null; mount -t tmpfs tmpfs "$d" || exit 4; done
        touch /.rw-probe 2>/dev/null && exit 5
        printf '%s' "$config" > /tmp/cluster.yaml
        helios serve --config /tmp/cluster.yaml < /dev/null > /tmp/serve.log 2>&1 &
        serve=$!
        for i in $(seq 1 100); do curl -sf http://127.0.0.1:{port}/health > /dev/null && break; sleep 3; done
        curl -s http://127.0.0.1:{port}/v1/completions -H 'content-type: application/json' \\
            -d '{{"model": "smollm2", "prompt": "def add(a, b):", "max_tokens": 4}}' > /tmp/reply.json
        kill -INT $serve
        for i in $(seq 1 60); do kill -0 $serve 2> /dev/null || break; sleep 1; done
        kill -KILL $serve 2> /dev/null
        echo "REPLY $(cat /tmp/reply.json)"
        echo "READ-ONLY ERRORS $(grep -ci 'read-only file system' /tmp/serve.log)"
        tail -n 40 /tmp/serve.log
        # whatever Ray left running lives in this mount namespace alone
        ns=$(readlink /proc/$$/ns/mnt)
        for p in /proc/[0-9]*; do
            pid=${{p#/proc/}}
            [ "$pid" != $$ ] && [ "$(readlink $p/ns/mnt 2> /dev/null)" = "$ns" ] && kill -KILL $pid 2> /dev/null
        done
        true
        """)
    env = {**os.environ, "REDIS_URL": redis_url}
    run = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, env=env,
                         timeout=480, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stdout + run.stderr
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line.startswith(("REPLY", "READ-ONLY")))
    assert lines.get("REPLY", "").startswith("{"), run.stdout  # no reply: the log's tail says why
    reply = json.loads(lines["REPLY"])
    assert reply["usage"]["completion_tokens"] == 4 and reply["choices"][0]["text"]
    assert lines["READ-ONLY"] == "ERRORS 0"
