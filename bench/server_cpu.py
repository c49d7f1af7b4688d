"""The CPU time a server process spends during a measurement window."""

import os


class ServerCpuMeter:
    """CPU seconds a server process uses during the measurement window.

    Throughput on a shared machine depends on what else runs; the CPU a
    server spends per operation much less so, which makes it the steadier
    figure for comparing two servers.  Read from /proc (Linux only).
    """

    def __init__(self, pid):
        self._stat_path = "/proc/%d/stat" % pid
        self._ticks_per_second = os.sysconf("SC_CLK_TCK")
        self._started = None
        self.seconds = None

    @staticmethod
    def available():
        return os.path.exists("/proc/self/stat")

    def _read(self):
        with open(self._stat_path) as stat:
            # Fields after the parenthesised command name; utime and stime
            # are the 14th and 15th fields of the whole line.
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / self._ticks_per_second

    def start(self):
        self._started = self._read()

    def stop(self):
        self.seconds = self._read() - self._started
