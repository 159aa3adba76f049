"""The cluster across two Ray nodes: candidates placed by node labels, and a lost node's candidate
comes back on the node that is left."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.conftest import free_port

pytestmark = pytest.mark.slow


def test_candidates_spread_over_two_nodes_and_survive_losing_one(smollm2, redis_url):
    import redis

    db = redis_url.rsplit("/", 1)[0] + "/7"  # its own database: the package's cluster keeps /0
    redis.Redis.from_url(db).flushdb()
    run = subprocess.run([sys.executable, "-m", "tests.cluster.two_nodes", str(smollm2.home), db, str(free_port())],
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2],
                         env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["before"] == {"a": seen["head"], "b": seen["worker"]}  # each on its labelled node
    assert seen["after"] == {"a": seen["head"], "b": seen["head"]}  # b moved when its node died
