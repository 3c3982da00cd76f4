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
    writer.take_pointer()  # the ports are bound

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


def boot_logs(logs: Path) -> list[str]:
    return sorted(p.name for p in (logs / "_boot").iterdir() if p.name.endswith(".log"))


def test_only_a_boot_that_takes_the_pointer_moves_it_and_prunes(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    (logs / "_boot").mkdir(parents=True)
    for n in range(3):
        (logs / "_boot" / f"2020010{n}T000000Z_boot_old.log").write_text(f"old {n}\n")
    serving = str(logs / "_boot" / "20200102T000000Z_boot_old.log")
    (logs / "_boot" / "latest.txt").write_text(serving + "\n")

    failed, failed_path = open_logs(str(logs), 1 << 20, 2, lambda: None)
    failed.put("boot", b"config error: api.listen: cannot listen\n")
    failed.stop()  # a boot that could not bind: its log stays, the pointer and the other logs too
    assert (logs / "_boot" / "latest.txt").read_text() == serving + "\n"
    assert Path(failed_path).read_bytes() == b"config error: api.listen: cannot listen\n"
    assert len(boot_logs(logs)) == 4

    writer, boot_path = open_logs(str(logs), 1 << 20, 2, lambda: None)
    writer.put("boot", b"serving\n")
    writer.take_pointer()
    writer.stop()
    assert (logs / "_boot" / "latest.txt").read_text() == boot_path + "\n"
    assert Path(boot_path).name in boot_logs(logs) and len(boot_logs(logs)) == 2  # keep = 2, this one included


def test_a_boot_log_without_the_pointer_made_again_leaves_the_pointer_alone(tmp_path: Path) -> None:
    clock = FakeClock()
    pointer = tmp_path / "latest.txt"
    pointer.write_text("/elsewhere.log\n")
    target = AppendFile(str(tmp_path / "boot" / "b.log"), str(pointer), clock)
    target.write(b"one\n")
    shutil.rmtree(tmp_path / "boot")
    clock.now += 1
    target.write(b"two\n")
    assert pointer.read_text() == "/elsewhere.log\n"
    target.take_pointer()
    shutil.rmtree(tmp_path / "boot")
    clock.now += 1
    target.write(b"three\n")
    assert pointer.read_text() == str(tmp_path / "boot" / "b.log") + "\n"
    target.close()


def test_two_boots_in_one_second_get_a_boot_log_each(tmp_path: Path, monkeypatch) -> None:
    from llamad import logs

    monkeypatch.setattr(logs, "utc_stamp", lambda seconds=None: "20260101T000000Z")
    first, first_path = open_logs(str(tmp_path), 1 << 20, 3, lambda: None)
    second, second_path = open_logs(str(tmp_path), 1 << 20, 3, lambda: None)
    first.put("boot", b"first\n")
    second.put("boot", b"second\n")
    first.stop()
    second.stop()
    assert Path(second_path).name == Path(first_path).name.replace(".log", ".1.log")
    assert (Path(first_path).read_bytes(), Path(second_path).read_bytes()) == (b"first\n", b"second\n")
