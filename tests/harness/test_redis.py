"""harness.redis: a private redis-server that starts, dies like a crash, and comes back;
a private Redis Cluster whose replicas take over."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from harness.redis import RedisCluster, RedisProcess, redis_answers


def test_a_private_redis_answers_until_killed_and_again_on_the_same_port(tmp_path: Path) -> None:
    private = RedisProcess(tmp_path, db=3)
    assert private.url == f"redis://127.0.0.1:{private.port}/3"
    private.start()
    try:
        assert redis_answers(private.url)
        private.kill()
        assert private.proc is None
        assert not redis_answers(private.url)
        private.start()
        client = redis.Redis.from_url(private.url)
        assert client.ping()
        client.close()
    finally:
        private.kill()


def test_a_missing_redis_server_raises_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on it
    with pytest.raises(RuntimeError, match="redis-server is not installed") as caught:
        RedisProcess(tmp_path).start()
    assert "\n" not in str(caught.value)


def test_a_private_cluster_has_three_masters_and_a_replica_takes_over_a_killed_one(
    tmp_path: Path,
) -> None:
    cluster = RedisCluster(tmp_path)
    cluster.start()
    try:
        masters = cluster.masters()
        assert len(masters) == 3
        owner = cluster.master_of("simmer:{a}:session")
        assert owner in masters
        assert cluster.master_of("simmer:{a}:lock") == owner  # one hash tag, one shard
        cluster.kill(owner)
        cluster.wait_failover(owner)
        assert cluster.master_of("simmer:{a}:session") not in masters
        assert len(cluster.masters()) == 3
    finally:
        cluster.stop()
