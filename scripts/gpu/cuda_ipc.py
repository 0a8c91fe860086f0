"""CUDA IPC regions on a real GPU, run ON THE GPU MACHINE: a tacflowd on the
CUDA backend (the built-in `tiny` model) opens a torch allocation of this
process through its IPC handle (`cuIpcOpenMemHandle` in the daemon's
context) with an interprocess event, and refuses what it must: a region
past the exported allocation, another device's UUID, a handle the driver
cannot open; unregistering closes it, and the daemon stays healthy.

    python3 scripts/gpu/cuda_ipc.py --bin /tmp/tacflowd
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "client-py"))

from tacflow import Client, CudaRegion  # noqa: E402
from tacflow import errors as E  # noqa: E402
from tacflow.protocol import Kind  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="/tmp/tacflowd")
    args = ap.parse_args()
    work = tempfile.mkdtemp()
    sock = os.path.join(work, "d.sock")
    log = open(os.path.join(work, "d.log"), "wb")
    proc = subprocess.Popen([args.bin, "serve", "--socket", sock, "--backend", "cuda", "--model", "tiny",
                             "--kv-blocks", "64"], stdout=log, stderr=subprocess.STDOUT)
    failures = 0

    def check(name, ok, detail=""):
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")

    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                print(open(log.name).read())
                return 1
            time.sleep(0.1)
        c = Client(f"ipc://{sock}", timeout_s=60)
        print("daemon backend:", c.info.backend)
        x = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
        st = x.untyped_storage()
        shared = st._share_cuda_()
        handle, size, offset = shared[1], shared[2], shared[3]
        uuid = "GPU-" + str(torch.cuda.get_device_properties(0).uuid)
        ev = torch.cuda.Event(interprocess=True)
        ev.record()
        evh = ev.ipc_handle()
        print(f"handle {len(handle)} bytes, storage {size} bytes at offset {offset}, {uuid}")
        desc = CudaRegion(bytes(handle), uuid, size, offset=offset, event_handle=bytes(evh))
        before = c.stats().regions
        reply = c.request(Kind.REGISTER_REGION, {"region": desc.to_wire()})
        check("register with an event", reply["byte_size"] == size and len(reply.get("event_handle", b"")) == 64,
              f"region {reply['region_id']}")
        check("counted", c.stats().regions == before + 1)
        for name, bad, cls in [
            ("past the allocation", CudaRegion(bytes(handle), uuid, 1 << 40, offset=offset), E.OutOfBounds),
            ("another device", CudaRegion(bytes(handle), "GPU-ffffffff-0000-0000-0000-000000000000", size), E.BadRequest),
            ("a handle the driver cannot open", CudaRegion(bytes(64), uuid, 4096), E.BadRequest),
            ("a malformed handle", CudaRegion(bytes(10), uuid, 4096), E.BadRequest),
        ]:
            try:
                c.register_region(bad)
                check(name, False, "accepted")
            except cls as e:
                check(name, True, f"{e.code}: {e.message[:100]}")
            except E.TacflowError as e:
                check(name, False, f"{e.code}: {e.message}")
        check("refusals left nothing", c.stats().regions == before + 1)
        c.unregister_region(reply["region_id"])
        check("unregistered", c.stats().regions == before)
        again = c.request(Kind.REGISTER_REGION, {"region": desc.to_wire()})
        check("registers again after a close", again["region_id"] != reply["region_id"])
        c.close()
        c = Client(f"ipc://{sock}", timeout_s=60)
        check("a closed session's region went with it", c.stats().regions == 0)
        check("healthy", c.health().ok, str(c.health()))
        torch.cuda.synchronize()
        check("the client's memory is intact", bool((x[:16] == torch.arange(16, device="cuda")).all()))
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
