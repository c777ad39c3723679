"""What a binary upgrade's new master takes over from the old one: its counters.

A USR2 starts a new master (``MESHD_UPGRADE_FROM`` names the old one), which creates a
region of its own under the same name. Without this, every counter would start at 0
again. :func:`open_old` maps the old master's region before the new one replaces its
name (same layout VERSION and fingerprint, and the old master's pid in its header:
otherwise the counters start afresh, logged); the new region is sized to hold it
(:func:`sizes`), starts from its header counters and health rows, and :class:`Carry`
keeps the old master's first ``slots used`` slots copied into every region of the new
master until the old master is gone, then once more (see "Binary upgrade" in
``meshd.shm``). The new control process is seeded with the old master's newest
snapshot (:func:`copy_snapshot`), so rows keep their meaning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from meshd.errors import ShmError
from meshd.private_files import read_trusted, write_atomic
from meshd.shm import (
    OFF_GENERATION,
    OFF_MASTER_PID,
    OFF_SLOTS_USED,
    Region,
    carry_slots,
    inherit,
    region_path,
)
from meshd.snapshot import snapshot_path

log = logging.getLogger("meshd.master")

SNAPSHOT_GENERATIONS = 16   # how far back the old master's snapshots are looked for


def open_old(shm_dir: str, instance: str, old_pid: int) -> Region | None:
    """The old master's region, mapped read-write (the new master only reads it, but a
    writable map lets ``carry_slots`` share code), or None (logged: counters restart)."""
    path = region_path(shm_dir, instance)
    try:
        old = Region.attach(path, writable=True)
    except ShmError as e:
        log.warning("binary upgrade: the old master's counters are not carried over (%s); "
                    "they start at 0", e)
        return None
    if old.get_u32(OFF_MASTER_PID) != old_pid:
        log.warning("binary upgrade: %s belongs to master %d, not %d; counters start at 0",
                    path, old.get_u32(OFF_MASTER_PID), old_pid)
        old.close()
        return None
    return old


def sizes(old: Region | None, slots: int, rows: int, endpoint_rows: int) -> tuple[int, int, int]:
    """(slots, rows, endpoint rows) of the new region: what the config asks for, at least
    the old region's, with room beside the carried slots for this master's processes."""
    if old is None:
        return slots, rows, endpoint_rows
    used = old.get_u32(OFF_SLOTS_USED)
    return (max(slots + used, old.slots), max(rows, old.rows),
            max(endpoint_rows, old.endpoint_rows))


def copy_snapshot(old: Region, shm_dir: str, instance: str, old_pid: int) -> str | None:
    """The old master's newest snapshot, copied to this master's generation 0 (the old
    master removes its own when it exits); its path, or None if there is none."""
    newest = old.get_u64(OFF_GENERATION)
    for gen in range(newest, max(0, newest - SNAPSHOT_GENERATIONS), -1):
        try:
            data = read_trusted(snapshot_path(shm_dir, instance, old_pid, gen))
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("binary upgrade: the old master's snapshot of generation %d: %s",
                        gen, e)
            continue
        path = snapshot_path(shm_dir, instance, os.getpid(), 0)
        try:
            write_atomic(path, data)
        except OSError as e:
            log.warning("binary upgrade: cannot copy the old master's snapshot: %s; rows "
                        "start afresh", e)
            return None
        return path
    log.warning("binary upgrade: no snapshot of the old master found; rows start afresh")
    return None


class Carry:
    """The old master's slots, kept copied into this master's regions while it lives."""

    def __init__(self, old: Region, old_pid: int) -> None:
        self.old = old
        self.old_pid = old_pid
        self.slots = old.get_u32(OFF_SLOTS_USED)

    def start(self, new: Region) -> None:
        inherit(self.old, new)
        carry_slots(self.old, new, self.slots)
        log.info("binary upgrade: carrying the counters of the old master %d (%d slots)",
                 self.old_pid, self.slots)

    def step(self, regions: Iterable[Region]) -> bool:
        """Copy the old slots again; False once the old master is gone (after one last
        copy: its final counts) and the slots are free for this master's processes."""
        gone = os.getppid() != self.old_pid   # the new master is the old one's child
        for region in regions:
            carry_slots(self.old, region, self.slots)
        if gone:
            log.info("binary upgrade: the old master %d is gone; its counts are kept",
                     self.old_pid)
            self.old.close()
        return not gone
