"""The console scripts, as ``pip install`` puts them on a user's PATH.

The project is installed with pip into a virtualenv made for this module
(its dependencies come from the test environment through a ``.pth``
file, so nothing is downloaded), and every command runs from that
virtualenv's ``bin`` by name: ``-h``, ``--version`` and one real action
each, against a server started with the installed ``zeo-runzeo``.
"""

import configparser
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

import zeo
from server_process import ServerProcess
from zeo.command_line import COMMANDS, DISTRIBUTION, distribution_version

pytestmark = pytest.mark.timeout(300)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT = 90
#: ZEO's console scripts (its entry points): ours must not take them.
ZEO_COMMANDS = {"runzeo", "zeopack", "zeoctl", "zeo-nagios"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtualenv with this project pip-installed into it: the
    directory of its scripts."""
    root = tmp_path_factory.mktemp("console-scripts")
    source = root / "source"
    source.mkdir()
    for name in ("setup.py", "README.rst"):
        shutil.copy(os.path.join(PROJECT_ROOT, name), source)
    shutil.copytree(os.path.join(PROJECT_ROOT, "zeo"), source / "zeo",
                    ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip",
                    str(venv)], check=True, timeout=RUN_TIMEOUT)
    python = venv / "bin" / "python"
    [site_packages] = glob.glob(str(venv / "lib" / "python*" /
                                    "site-packages"))
    with open(os.path.join(site_packages, "test-dependencies.pth"),
              "w") as pth:
        pth.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install",
         "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         str(source)], check=True, timeout=RUN_TIMEOUT,
        capture_output=True)
    found = subprocess.run(  # not from the project directory: "" is first
        [str(python), "-c", "import zeo; print(zeo.__file__)"], cwd=root,
        capture_output=True, text=True, check=True, timeout=RUN_TIMEOUT)
    assert found.stdout.startswith(site_packages), (
        "the virtualenv imports zeo from %s, not from its own install"
        % found.stdout)
    return venv / "bin"


def run(bin_directory, command, *args, cwd=None):
    return subprocess.run(
        [str(bin_directory / command)] + [str(arg) for arg in args],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=cwd,
        stdin=subprocess.DEVNULL)


def test_pip_installs_every_command_and_none_of_zeos(installed):
    [entry_points_file] = glob.glob(str(
        installed.parent / "lib" / "python*" / "site-packages" /
        "zeo_threaded-*.dist-info" / "entry_points.txt"))
    entry_points = configparser.ConfigParser()
    entry_points.read(entry_points_file)
    scripts = dict(entry_points["console_scripts"])
    assert {name: target.split(":")[0] for name, target in scripts.items()
            } == COMMANDS
    assert all(target.endswith(":main") for target in scripts.values())
    assert not ZEO_COMMANDS & set(scripts)
    for name in COMMANDS:
        assert os.access(installed / name, os.X_OK), name


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_and_version(installed, command):
    helped = run(installed, command, "-h")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: %s " % command)
    versioned = run(installed, command, "--version")
    assert versioned.returncode == 0, versioned.stderr
    assert versioned.stdout.strip() == "%s %s" % (
        DISTRIBUTION, distribution_version())


def test_module_form_names_itself_as_run(tmp_path):
    """``python -m`` keeps naming the module in its usage line."""
    helped = subprocess.run(
        [sys.executable, "-m", "zeo.scripts.zeopack", "-h"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=tmp_path)
    assert helped.stdout.startswith("usage: python -m zeo.scripts.zeopack ")


@pytest.fixture
def server(installed, tmp_path):
    """Our server, started by the installed ``zeo-runzeo``."""
    process = ServerProcess(
        ["-a", "127.0.0.1:0", "-f", tmp_path / "Data.fs"],
        command=[str(installed / "zeo-runzeo")])
    yield process
    assert process.stop() == 0, process.log


def _address(server):
    return "%s:%d" % server.address


def test_runzeo_up_and_pack_against_the_server(installed, server):
    up = run(installed, "zeo-up", "--allow-empty", _address(server))
    assert up.returncode == 0, up.stdout + up.stderr
    assert up.stdout.startswith("OK")
    packed = run(installed, "zeo-pack", _address(server))
    assert packed.returncode == 0, packed.stdout + packed.stderr
    assert re.match(r"packed storage '1' on 127\.0\.0\.1:\d+ to ",
                    packed.stdout), packed.stdout


def test_cache_tools_read_a_trace_of_the_server(installed, server, tmp_path):
    trace_path = tmp_path / "client.trace"
    db = zeo.DB(server.address, cache_trace=str(trace_path))
    try:
        with db.transaction() as connection:
            connection.root()["x"] = 1
        with db.transaction() as connection:
            assert connection.root()["x"] == 1
    finally:
        db.close()
    stats = run(installed, "zeo-cache-stats", trace_path)
    assert stats.returncode == 0, stats.stderr
    assert re.search(r"^Loads: +[1-9]", stats.stdout, re.M), stats.stdout
    simulated = run(installed, "zeo-cache-simul", trace_path, "-s", "1")
    assert simulated.returncode == 0, simulated.stderr
    assert simulated.stdout.strip()


def test_ctl_starts_queries_and_stops_a_server(installed, tmp_path):
    config = tmp_path / "zeo.conf"
    config.write_text(
        "<zeo>\n  address 127.0.0.1:0\n</zeo>\n"
        "<filestorage 1>\n  path %s\n</filestorage>\n"
        % (tmp_path / "Data.fs"))
    started = run(installed, "zeo-ctl", "-C", config, "start", cwd=tmp_path)
    try:
        assert "daemon process started" in started.stdout, (
            started.stdout + started.stderr)
        status = run(installed, "zeo-ctl", "-C", config, "status",
                     cwd=tmp_path)
        assert re.search(r"program running; pid=\d+", status.stdout), (
            status.stdout)
    finally:
        stopped = run(installed, "zeo-ctl", "-C", config, "stop",
                      cwd=tmp_path)
    assert "daemon process stopped" in stopped.stdout, stopped.stdout
