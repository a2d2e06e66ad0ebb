"""MODELBAY_REDIS_URL's two forms (tasks/redisurl.py) and the clients made from them
(tasks/redisconn.py): the Sentinel list, the master name, the passwords, and every bad form
refused at start with a SettingsError naming the variable."""
from __future__ import annotations

import pytest
import redis

from tasks.celery_app import make_celery
from tasks.redisconn import broker_transport, broker_transport_options, broker_url, make_client
from tasks.redisurl import RedisUrlError, parse_redis_target
from tasks.sentinelconn import FollowingConnection
from tasks.settings import SettingsError, load_settings

SENTINELS = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://s3.example"


def sentinel_env(**more: str) -> dict[str, str]:
    return {"MODELBAY_REDIS_URL": SENTINELS, "MODELBAY_REDIS_SENTINEL_MASTER": "mymaster", **more}


def test_a_plain_url_is_kept_as_given() -> None:
    target = parse_redis_target("redis://:pw@valkey:6379/2")
    assert not target.sentinel and target.broker_url() == "redis://:pw@valkey:6379/2"
    settings = load_settings({"MODELBAY_REDIS_URL": "redis://valkey:6379/0"})
    assert broker_url(settings) == "redis://valkey:6379/0" and broker_transport(settings) == "tasks.broker:Transport"
    assert "master_name" not in broker_transport_options(settings)


def test_the_sentinel_list_master_and_default_port() -> None:
    target = parse_redis_target(SENTINELS, "mymaster")
    assert target.sentinel and target.master == "mymaster" and target.db == 0
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("s3.example", 26379))
    assert target.password is None and target.sentinel_password is None


def test_passwords_go_where_kombu_puts_them() -> None:
    """The first entry's password is the data nodes' (kombu's convention), as is
    MODELBAY_REDIS_PASSWORD; the Sentinels' own goes to sentinel_kwargs."""
    from_url = parse_redis_target("sentinel://app:s%40cret@h1:26379/3;sentinel://h2", "m")
    assert (from_url.username, from_url.password, from_url.db) == ("app", "s@cret", 3)
    settings = load_settings(sentinel_env(MODELBAY_REDIS_PASSWORD="data pw", MODELBAY_REDIS_SENTINEL_PASSWORD="spw"))
    url = broker_url(settings)
    assert url.startswith("sentinel://:data%20pw@10.0.0.1:26379/0;sentinel://10.0.0.2:26380;")
    options = broker_transport_options(settings)
    assert options["master_name"] == "mymaster" and options["sentinel_kwargs"]["password"] == "spw"
    assert broker_transport(settings) == "tasks.broker:SentinelTransport"


def test_celery_gets_the_sentinel_transport_and_options() -> None:
    conf = make_celery(load_settings(sentinel_env(MODELBAY_REDIS_WAIT_REPLICAS="1"))).conf
    assert conf.broker_url.startswith("sentinel://10.0.0.1:26379/0;")
    assert conf.broker_transport == "tasks.broker:SentinelTransport"
    assert conf.broker_transport_options["master_name"] == "mymaster"
    assert conf.broker_transport_options["wait_replicas"] == 1
    assert conf.broker_transport_options["visibility_timeout"] == 7200  # the options set before are kept


def test_the_store_client_follows_the_master() -> None:
    client = make_client(load_settings(sentinel_env(MODELBAY_REDIS_PASSWORD="pw")))
    pool = client.connection_pool
    assert pool.service_name == "mymaster" and pool.connection_class is FollowingConnection
    assert pool.connection_kwargs["password"] == "pw" and pool.connection_kwargs["decode_responses"] is True
    assert isinstance(make_client(load_settings({"MODELBAY_REDIS_URL": "redis://h:1/0"})), redis.Redis)


@pytest.mark.parametrize(("env", "says"), [
    ({"MODELBAY_REDIS_URL": SENTINELS}, "MODELBAY_REDIS_SENTINEL_MASTER is required"),
    (sentinel_env(MODELBAY_REDIS_URL="sentinel://h1:26379;redis://h2:6379"), "no redis:// mixed in"),
    (sentinel_env(MODELBAY_REDIS_URL="sentinel://h1:notaport"), "port is not a number"),
    (sentinel_env(MODELBAY_REDIS_URL="sentinel://:26379"), "no host"),
    (sentinel_env(MODELBAY_REDIS_URL="sentinel://h1/x"), "the db must be a number"),
    (sentinel_env(MODELBAY_REDIS_URL="sentinel://h1/1;sentinel://h2/2"), "different dbs"),
    (sentinel_env(MODELBAY_REDIS_URL="sentinel://h1;sentinel://:pw@h2"), "on the first entry only"),
    (sentinel_env(MODELBAY_REDIS_URL="sentinel://:a@h1", MODELBAY_REDIS_PASSWORD="b"), "given twice"),
    ({"MODELBAY_REDIS_URL": "redis://h:6379/0", "MODELBAY_REDIS_SENTINEL_MASTER": "m"}, "only for a sentinel://"),
    ({"MODELBAY_REDIS_URL": "redis://h:6379/0", "MODELBAY_REDIS_PASSWORD": "pw"}, "only for a sentinel://"),
    ({"MODELBAY_REDIS_URL": "redis://h1;redis://h2"}, "only possible as sentinel://"),
    ({"MODELBAY_REDIS_URL": "http://h:6379"}, "expected redis://"),
    ({"MODELBAY_REDIS_URL": "valkey:6379"}, "expected redis://"),
    ({"MODELBAY_REDIS_WAIT_REPLICAS": "-1"}, "MODELBAY_REDIS_WAIT_REPLICAS"),
])
def test_bad_forms_fail_at_start_naming_the_variable(env: dict[str, str], says: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    assert says in str(caught.value)


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(RedisUrlError) as caught:
        parse_redis_target("sentinel://h:x;redis://y")
    assert len(caught.value.problems) == 3  # the port, the redis:// entry, the missing master
