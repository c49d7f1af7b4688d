"""The client process of `pair_interpreters.py`.

Run as ``python pair_client.py SPEC`` (a JSON object: `impl`, `port`,
`oids` in hex, `duration`) by the interpreter being measured: it opens
that implementation's ClientStorage with a 1-byte cache, says "ready",
loads the objects in turn from the line "go" on standard input until the
window ends, and prints its count of loads and its CPU time as JSON.
Only the standard library and the client package are imported.
"""

import importlib
import json
import sys
import time


def run_client(spec):
    module = importlib.import_module(spec["impl"] + ".ClientStorage")
    storage = module.ClientStorage(("127.0.0.1", spec["port"]),
                                   cache_size=1, wait_timeout=30)
    oids = [bytes.fromhex(oid) for oid in spec["oids"]]
    try:
        storage.load(oids[0])
        print("ready", flush=True)
        sys.stdin.readline()
        cpu_at_start = time.process_time()
        end_at = time.monotonic() + spec["duration"]
        loads = 0
        while time.monotonic() < end_at:
            storage.load(oids[loads % len(oids)])
            loads += 1
        print(json.dumps({"loads": loads,
                          "cpu": time.process_time() - cpu_at_start}),
              flush=True)
    finally:
        storage.close()


if __name__ == "__main__":
    run_client(json.loads(sys.argv[1]))
