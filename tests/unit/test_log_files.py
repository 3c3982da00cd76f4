"""Log files that come back after their directory is deleted under a running daemon."""

from __future__ import annotations

import shutil
from pathlib import Path

from llamad.logs import AppendFile, RotatingFile, open_logs


class FakeClock:
    """A monotonic clock that the test (or the writer thread, in queue order) moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Action:
    """A log target whose write runs ``action`` in the writer thread, in queue order."""

    def __init__(self, action) -> None:
        self.action = action

    def write(self, data: bytes) -> None:
        self.action()

    def close(self) -> None:
        pass


def test_the_child_log_comes_back_within_a_second_of_its_directory_being_deleted(tmp_path: Path) -> None:
    clock = FakeClock()
    target = RotatingFile(str(tmp_path / "logs" / "llama"), 1 << 20, 3, "i", clock)
    target.write(b"one\n")
    shutil.rmtree(tmp_path / "logs")
    clock.now += 0.5
    target.write(b"two\n")  # checked at most once a second: still the deleted file
    assert not (tmp_path / "logs").exists()
    clock.now += 0.5
    target.write(b"three\n")
    assert (tmp_path / "logs" / "llama" / "latest.txt").read_bytes() == b"three\n"
    assert target.size == len(b"three\n")


def test_a_log_file_unlinked_or_replaced_at_its_path_is_reopened(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "boot.log"
    target = AppendFile(str(path), clock=clock)
    target.write(b"one\n")
    path.unlink()
    clock.now += 1
    target.write(b"two\n")
    assert path.read_bytes() == b"two\n"
    path.rename(tmp_path / "moved.log")
    path.write_bytes(b"other\n")
    clock.now += 1
    target.write(b"three\n")
    assert path.read_bytes() == b"other\nthree\n"
    target.close()


def test_the_writer_brings_back_the_child_log_the_boot_log_and_its_pointer(tmp_path: Path) -> None:
    clock = FakeClock()
    logs = tmp_path / "logs"
    writer, boot_path = open_logs(str(logs), 1 << 20, 3, lambda: None, clock)

    def tick() -> None:
        clock.now += 1.0

    writer.add("rm", Action(lambda: shutil.rmtree(logs)))
    writer.add("tick", Action(tick))
    # In queue order: a line each, the directory deleted, a line each into the deleted
    # files (not checked yet), a second later a line each into files made anew.
    for n, name in enumerate(("boot", "child", "rm", "boot", "child", "tick", "boot", "child")):
        writer.put(name, f"{name} {n}\n".encode())
    writer.stop()
    assert writer.errors == 0
    assert (logs / "llama" / "latest.txt").read_bytes() == b"child 7\n"
    assert (logs / "_boot" / "latest.txt").read_text() == boot_path + "\n"
    assert Path(boot_path).read_bytes() == b"boot 6\n"
