"""Fixtures for serving RelStorage: one PostgreSQL cluster per test run,
a fresh database per test, servers started from a zeo.conf with
``%import relstorage``.

Import the fixtures into a test module (``from relstorage_fixtures import
postgres, database``) to use them.
"""

import os

import pytest

from conftest import server_environment
from postgres_cluster import PostgresCluster, relstorage_section
from server_process import OURS, start_configured_server

#: The poll interval the two-server tests configure (seconds).
POLL_INTERVAL = 0.1


@pytest.fixture(scope="session")
def postgres():
    cluster = PostgresCluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def database(postgres):
    """A fresh database's DSN."""
    with postgres.database() as name:
        yield postgres.dsn(name)


def relstorage_config(dsn, keep_history=True, name="1"):
    """The storages argument of `start_configured_server` for one
    RelStorage named `name`."""
    return {name: "%%import relstorage\n%s"
            % relstorage_section(name, dsn, keep_history)}


def start_relstorage_server(directory, dsn, keep_history=True, impl=OURS,
                            zeo_options="poll-interval %s" % POLL_INTERVAL,
                            label="server"):
    """A server process (ours by default) serving the database `dsn`."""
    directory = os.path.join(directory, label)
    os.makedirs(directory, exist_ok=True)
    if impl != OURS:
        zeo_options = ""
    return start_configured_server(
        directory, zeo_options, relstorage_config(dsn, keep_history),
        impl=impl, env=server_environment())
