"""Host regions: numpy views, tensor references, cleanup."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from tacflow.errors import UnknownRegion
from tacflow.protocol import TensorRef
from tacflow.region import HostRegion, bf16_to_f32, check_ref, contiguous_strides, wire_dtype


class StubClient:
    """Records unregister calls; what HostRegion needs of a client."""

    def __init__(self, fail: bool = False) -> None:
        self.unregistered: list[int] = []
        self.forgotten: list[HostRegion] = []
        self.is_open = True
        self.fail = fail

    def unregister_region(self, region_id: int) -> None:
        self.unregistered.append(region_id)
        if self.fail:
            raise UnknownRegion("unknown_region", "gone")

    def _forget_region(self, region: HostRegion) -> None:
        self.forgotten.append(region)


def shm_exists(name: str) -> bool:
    return Path("/dev/shm", name.lstrip("/")).exists()


@pytest.fixture
def region():
    client = StubClient()
    shm = shared_memory.SharedMemory(create=True, size=4096)
    r = HostRegion(client, shm, 7)
    yield r
    r.close()


def test_array_views_share_memory(region: HostRegion) -> None:
    a = region.array("f32", (4, 8), offset=64)
    a[:] = np.arange(32, dtype=np.float32).reshape(4, 8)
    raw = np.frombuffer(region.buf, dtype=np.uint8)
    assert raw[64:68].view(np.float32)[0] == 0.0
    assert raw[64 + 4 * 9 : 64 + 4 * 10].view(np.float32)[0] == 9.0
    b = region.array(np.float32, 32, offset=64)
    assert b[9] == 9.0
    assert region.array("bf16", (2,)).dtype == np.uint16


def test_array_checks_alignment_and_size(region: HostRegion) -> None:
    with pytest.raises(ValueError):
        region.array("f32", (2,), offset=2)
    with pytest.raises(ValueError, match="exceeds"):
        region.array("f32", (2000,))


def test_ref_contiguous(region: HostRegion) -> None:
    ref = region.ref(256, "bf16", (3, 512))
    assert ref == TensorRef(7, 256, "bf16", (3, 512), None)
    assert ref.to_wire() == {"region_id": 7, "offset": 256, "dtype": "bf16", "shape": [3, 512]}
    assert region.ref(0, np.int64, [2]).dtype == "i64"


def test_ref_strided_and_view(region: HostRegion) -> None:
    base = region.array("f32", (4, 10))
    base[:] = np.arange(40, dtype=np.float32).reshape(4, 10)
    # Rows of 3 in rows of 10, starting at column 2 of row 1.
    ref = region.ref(4 * (10 + 2), "f32", (3, 3), strides=(10, 1))
    assert ref.to_wire()["strides"] == [10, 1]
    np.testing.assert_array_equal(region.view(ref), base[1:4, 2:5])
    # Transposed (column-major) view.
    t = region.ref(0, "f32", (10, 4), strides=(1, 10))
    np.testing.assert_array_equal(region.view(t), base.T)


def test_ref_of_round_trips_views(region: HostRegion) -> None:
    base = region.array("f16", (8, 16), offset=128)
    assert region.ref_of(base) == region.ref(128, "f16", (8, 16))
    sub = base[2:5, 4:12:2]
    ref = region.ref_of(sub)
    assert ref.offset == 128 + 2 * (2 * 16 + 4)
    assert ref.strides == (16, 2)
    np.testing.assert_array_equal(region.view(ref), sub)
    with pytest.raises(ValueError):
        region.ref_of(np.zeros(3, np.float16))


def test_ref_bounds_checks(region: HostRegion) -> None:
    assert region.ref(4096 - 16, "f32", (4,)).offset == 4080  # ends exactly at the end
    with pytest.raises(ValueError, match="past"):
        region.ref(4096 - 12, "f32", (4,))
    with pytest.raises(ValueError, match="aligned"):
        region.ref(2, "f32", (1,))
    with pytest.raises(ValueError, match="strides"):
        region.ref(0, "u8", (2, 2), strides=(1,))
    with pytest.raises(ValueError, match="dimensions"):
        region.ref(0, "u8", (1,) * 9)
    with pytest.raises(ValueError, match="past"):  # the last strided element is out
        region.ref(0, "f32", (2, 3), strides=(1024, 1))
    # Empty tensors touch nothing; only the offset must be inside.
    assert region.ref(4096, "f32", (0, 5)).shape == (0, 5)
    with pytest.raises(ValueError):
        region.ref(4100, "f32", (0,))
    # check=False lets a test send a bad reference to the daemon.
    assert region.ref(4096, "f32", (4,), check=False).offset == 4096


def test_check_ref_matches_daemon_examples() -> None:
    # The cases of ipc/src/tensor.rs's unit tests.
    check_ref(TensorRef(1, 16, "f32", (2, 3)), 16 + 24)
    with pytest.raises(ValueError):
        check_ref(TensorRef(1, 16, "f32", (2, 3)), 16 + 23)
    check_ref(TensorRef(1, 0, "bf16", (2, 3), (10, 1)), 13 * 2)
    with pytest.raises(ValueError):
        check_ref(TensorRef(1, 0, "bf16", (2, 3), (10, 1)), 13 * 2 - 1)
    assert contiguous_strides((2, 0, 3)) == (3, 3, 1)


def test_dtypes() -> None:
    assert [wire_dtype(d) for d in ("f32", np.float16, "int32", np.int64, np.uint8)] == [
        "f32", "f16", "i32", "i64", "u8",
    ]
    with pytest.raises(ValueError):
        wire_dtype(np.complex64)
    bits = np.array([0x3F80, 0xC000, 0x0000], dtype=np.uint16)  # 1.0, -2.0, 0.0
    np.testing.assert_array_equal(bf16_to_f32(bits), [1.0, -2.0, 0.0])


def test_close_unregisters_and_unlinks() -> None:
    client = StubClient()
    shm = shared_memory.SharedMemory(create=True, size=1024)
    r = HostRegion(client, shm, 3)
    view = r.array("u8", (16,))  # a live export: close must cope
    assert shm_exists(r.name)
    r.close()
    r.close()  # idempotent
    assert client.unregistered == [3] and client.forgotten == [r]
    assert not shm_exists(r.name)
    view[0] = 1  # the mapping outlives the name while a view holds it
    with pytest.raises(ValueError, match="closed"):
        r.array("u8", (1,))
    del view


def test_close_ignores_daemon_errors_and_closed_clients() -> None:
    failing = StubClient(fail=True)
    r = HostRegion(failing, shared_memory.SharedMemory(create=True, size=64), 1)
    r.close()
    assert not shm_exists(r.name)
    gone = StubClient()
    gone.is_open = False
    r = HostRegion(gone, shared_memory.SharedMemory(create=True, size=64), 2)
    with r:
        pass
    assert gone.unregistered == [] and not shm_exists(r.name)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


def test_resource_tracker_stays_quiet_after_close() -> None:
    proc = run_python(
        """
        from multiprocessing import shared_memory
        from tacflow.region import HostRegion
        r = HostRegion(None, shared_memory.SharedMemory(create=True, size=4096), 1)
        a = r.array("f32", (8,))
        r.close()
        print(r.name)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no "leaked shared_memory" warning, no double unlink
    assert not shm_exists(proc.stdout.strip())


def test_resource_tracker_cleans_up_a_forgotten_region() -> None:
    # A client that dies without closing leaves nothing in /dev/shm.
    proc = run_python(
        """
        from multiprocessing import shared_memory
        from tacflow.region import HostRegion
        r = HostRegion(None, shared_memory.SharedMemory(create=True, size=4096), 1)
        print(r.name)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert not shm_exists(proc.stdout.strip())


def test_views_outlive_a_dropped_region() -> None:
    # Dropping the region (not closing it) must not unmap under live views:
    # SharedMemory's own close would, and the next access would segfault.
    proc = run_python(
        """
        import gc
        from multiprocessing import shared_memory
        from tacflow.region import HostRegion
        r = HostRegion(None, shared_memory.SharedMemory(create=True, size=4096), 1)
        a = r.array("f32", (8,))
        v = r.view(r.ref(16, "f32", (2, 2), strides=(1, 2)))
        name = r.name
        r.close()
        del r
        gc.collect()
        a[:] = 3.0
        print(float(v.sum()), name)
        """
    )
    assert proc.returncode == 0, proc.stderr
    total, name = proc.stdout.split()
    assert float(total) == 12.0 and not shm_exists(name)
