"""Running the server as a daemon under zdaemon (issue 5).

`python -m zeo.zeoctl` and the shipped ``conf/zdaemon.conf`` start a real
server through zdaemon's manager; the tests follow it by the pid it
reports and by its pid file, and always stop it through zdaemon again,
then check that the process is gone.
"""

import os
import re
import subprocess
import sys
import time

import pytest

from raw_client import ruok
from server_process import free_port, temporary_directory

pytestmark = pytest.mark.timeout(180)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVIRONMENT = {"PYTHONPATH": os.pathsep.join(
    filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}
RUN_TIMEOUT = 90
RUNNING = re.compile(r"program running; pid=(\d+)")


@pytest.fixture
def tmp():
    with temporary_directory() as directory:
        yield directory


def run(command, cwd):
    environment = dict(os.environ)
    environment.update(ENVIRONMENT)
    return subprocess.run(command, cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=environment,
                          timeout=RUN_TIMEOUT)


def zeoctl(config, *action):
    return run([sys.executable, "-m", "zeo.zeoctl", "-C", config]
               + list(action), cwd=os.path.dirname(config))


def running_pid(status_output):
    match = RUNNING.search(status_output)
    assert match, status_output
    return int(match.group(1))


def is_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(condition, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.1)


def read_pid_file(path):
    with open(path) as pid_file:
        return int(pid_file.read())


def test_zeoctl_start_status_logreopen_restart_stop(tmp):
    port = free_port()
    run_directory = os.path.join(tmp, "run")
    os.mkdir(run_directory)
    pid_path = os.path.join(run_directory, "zeo.pid")
    log_path = os.path.join(tmp, "zeo.log")
    config = os.path.join(tmp, "zeo.conf")
    with open(config, "w") as config_file:
        config_file.write(
            "<zeo>\n  address 127.0.0.1:%d\n  pid-filename %s\n</zeo>\n"
            "<filestorage 1>\n  path Data.fs\n</filestorage>\n"
            "<eventlog>\n  <logfile>\n    path %s\n  </logfile>\n"
            "</eventlog>\n" % (port, pid_path, log_path))
    started = zeoctl(config, "start")
    servers = []
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "daemon process started" in started.stdout
        status = zeoctl(config, "status")
        assert status.returncode == 0
        pid = running_pid(status.stdout)
        servers.append(pid)
        wait_until(lambda: os.path.exists(pid_path), "the pid file")
        assert read_pid_file(pid_path) == pid
        wait_until(lambda: _answers(port), "the server to answer")
        # The derived zdaemon files sit beside the pid file; the storage
        # path is relative to the directory zeoctl was run from.
        assert os.path.exists(os.path.join(run_directory, "zeo.zdsock"))
        assert os.path.exists(os.path.join(tmp, "Data.fs"))

        os.rename(log_path, log_path + ".1")
        reopened = zeoctl(config, "logreopen")
        assert reopened.returncode == 0
        assert "signal SIGUSR2 sent to process %d" % pid in reopened.stdout
        wait_until(lambda: os.path.exists(log_path), "a new log file")

        restarted = zeoctl(config, "restart")
        assert "daemon process restarted" in restarted.stdout
        new_pid = running_pid(zeoctl(config, "status").stdout)
        servers.append(new_pid)
        assert new_pid != pid
        wait_until(lambda: not is_alive(pid), "the old server to exit")
        wait_until(lambda: os.path.exists(pid_path)
                   and read_pid_file(pid_path) == new_pid,
                   "the new pid in the pid file")
        wait_until(lambda: _answers(port), "the new server to answer")
    finally:
        stopped = zeoctl(config, "stop")
    assert "daemon process stopped" in stopped.stdout, stopped.stdout
    for server_pid in servers:
        wait_until(lambda: not is_alive(server_pid), "the server to exit")
    assert not os.path.exists(pid_path)
    after = zeoctl(config, "status")
    assert after.returncode == 3
    assert "daemon manager not running" in after.stdout
    with open(log_path) as log_file:
        log = log_file.read()
    assert "reopened the log files" in log
    assert "received SIGTERM; stopping" in log


def _answers(port):
    try:
        _greeting, status = ruok(("127.0.0.1", port), timeout=2)
    except OSError:
        return False
    return "1" in status


def test_zeoctl_refuses_a_bad_configuration(tmp):
    config = os.path.join(tmp, "zeo.conf")
    with open(config, "w") as config_file:
        config_file.write("<zeo>\n  address 127.0.0.1:0\n  colour blue\n"
                          "</zeo>\n<mappingstorage 1>\n</mappingstorage>\n")
    result = zeoctl(config, "start")
    assert result.returncode == 2
    assert result.stderr.startswith("Error: ")
    assert "colour" in result.stderr
    assert not os.path.exists(os.path.join(tmp, "zeo.zdsock"))


def test_shipped_zdaemon_conf_runs_the_shipped_server_config(tmp):
    """conf/zdaemon.conf and conf/zeo.conf as a user runs them from the
    project directory, with their fixed ports swapped for free ones."""
    port, monitor_port = free_port(), free_port()
    os.mkdir(os.path.join(tmp, "conf"))
    os.mkdir(os.path.join(tmp, "var"))
    os.symlink(sys.prefix, os.path.join(tmp, ".venv"))
    for name in ("zdaemon.conf", "zeo.conf"):
        with open(os.path.join(PROJECT_ROOT, "conf", name)) as source:
            text = source.read()
        assert "127.0.0.1:8090" in text
        text = text.replace("127.0.0.1:8090", "127.0.0.1:%d" % port)
        text = text.replace("127.0.0.1:8091", "127.0.0.1:%d" % monitor_port)
        with open(os.path.join(tmp, "conf", name), "w") as copy:
            copy.write(text)
    zdaemon = [os.path.join(".venv", "bin", "zdaemon"), "-C",
               "conf/zdaemon.conf"]
    assert os.access(os.path.join(tmp, zdaemon[0]), os.X_OK)
    started = run(zdaemon + ["start"], cwd=tmp)
    servers = []
    try:
        assert "daemon process started" in started.stdout, (
            started.stdout + started.stderr)
        servers.append(running_pid(run(zdaemon + ["status"], cwd=tmp).stdout))
        # start waited for the start test (zeoup): it answers already.
        assert _answers(port)
    finally:
        stopped = run(zdaemon + ["stop"], cwd=tmp)
    assert "daemon process stopped" in stopped.stdout, stopped.stdout
    for server_pid in servers:
        wait_until(lambda: not is_alive(server_pid), "the server to exit")
    assert servers, "the server was running"
    with open(os.path.join(tmp, "var", "zeo.log")) as log_file:
        assert "listening on 127.0.0.1:%d" % port in log_file.read()
