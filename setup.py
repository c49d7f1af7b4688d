from setuptools import find_packages, setup

#: Console scripts: zeo.command_line.COMMANDS names each one's module.
#: (setup.py cannot import the package it installs, so they are listed
#: here too; a test checks that the two lists agree.)
CONSOLE_SCRIPTS = [
    "zeo-runzeo = zeo.runzeo:main",
    "zeo-pack = zeo.scripts.zeopack:main",
    "zeo-up = zeo.scripts.zeoup:main",
    "zeo-ctl = zeo.zeoctl:main",
    "zeo-cache-stats = zeo.scripts.cache_stats:main",
    "zeo-cache-simul = zeo.scripts.cache_simul:main",
]

#: What the tests need, but for cryptography (see the "test" extras).
TEST_REQUIREMENTS = [
    "pytest",
    "pytest-timeout",
    "hypothesis",
    "ZEO>=6",
    "msgpack",
    "zdaemon",
    "zope.testing",
    # test_console_scripts builds the project without build
    # isolation (offline), which needs bdist_wheel.
    "wheel",
    "prometheus-client",
    # RelStorage on a private PostgreSQL cluster
    # (tests/postgres_cluster.py).
    "RelStorage>=4",
    "psycopg2-binary",
]

with open("README.rst", encoding="utf-8") as readme:
    long_description = readme.read()

setup(
    name="zeo-threaded",
    version="0.1.0",
    description="A thread-per-connection ZEO server and client for ZODB",
    long_description=long_description,
    long_description_content_type="text/x-rst",
    license="ZPL-2.1",
    packages=find_packages(include=["zeo", "zeo.*"]),
    package_data={"zeo": ["*.xml"]},
    python_requires=">=3.9",
    install_requires=[
        "ZODB>=5.6",
        "ZConfig>=3.6",
        "persistent",
        "transaction",
    ],
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    extras_require={
        "test": TEST_REQUIREMENTS + [
            # TLS tests make their certificates at test time.
            "cryptography"],
        # `make test-ft`: cryptography has no wheel for a free-threaded
        # interpreter (tests/tls_certificates.py makes do without it).
        "test-ft": TEST_REQUIREMENTS,
        "msgpack": ["msgpack"],
        # zeoctl: run the server as a daemon under zdaemon's manager.
        "daemon": ["zdaemon"],
        # metrics-address: a Prometheus endpoint.
        "metrics": ["prometheus-client"],
        # make soak: the plot of the server's memory, threads and files.
        "soak": ["matplotlib"],
        # %import relstorage: serve a RelStorage on PostgreSQL.
        "relstorage": ["RelStorage>=4", "psycopg2-binary"],
    },
)
