"""The master's shared-memory regions, one per config generation: created before the
first fork, grown on a reload, published under the instance's name once their generation
serves, kept in step while two are live, and closed or unlinked when nothing maps them.

Each generation maps one region (see "Growth" in ``meshd.shm``): the first one, or a grown
copy made for a reload, which waits at a temporary name until its generation serves and
only then takes ``{shm_dir}/meshd-{instance}.shm``. A region stays open while its
generation is the newest or the serving one or any process still maps it. While two
regions are live, :meth:`RegionSet.sync` copies every process's slot into the other ones,
so readers of either see every process, and a drained process's counts end up in the
region that stays.

The arbiter owns the process table and the generation numbers and tells this class what
happens to them; this class owns which file each generation maps and when each file goes.
Every call is from the master's loop: no locking.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from typing import Protocol

from meshd.config import Config
from meshd.errors import ShmError
from meshd.shm import OFF_ROWS_EXHAUSTED, Region, copy_region, copy_slot, grown_rows, region_path

log = logging.getLogger("meshd.master")


class Occupant(Protocol):
    """A live process as the region set sees it (the arbiter's ``Child``)."""

    @property
    def region(self) -> Region: ...     # the region it maps (its generation's)

    @property
    def slot(self) -> int: ...

    @property
    def generation(self) -> int: ...


class RegionSet:
    """The regions of the live generations. ``current`` is the one new processes map.

    Life cycle, as the arbiter drives it::

        create(generation, ...)           before the first fork
        begin(generation, cfg, procs)     an accepted reload: the new generation's region
        fall_back(generation, procs)      a reload that failed to boot: back to the old one
        serve(generation, procs)          the newest generation serves: it takes the name
        sync(procs)                       every loop: keep two live regions in step
        reaped(region, slot, procs)       a process is gone: free and fold in its slot
        unlink_all()                      the master exits

    ``procs`` is always every live process (reaped ones excluded).
    """

    def __init__(self, shm_dir: str, instance: str) -> None:
        self.path = region_path(shm_dir, instance)   # where readers (the CLI) look
        self._current: Region | None = None
        self._by_generation: dict[int, Region] = {}  # generation -> the region it maps
        self._open: list[Region] = []                 # every region mapped and not yet closed
        self._newest = 0
        self._serving = 0                             # the newest generation that has served
        self._inode = 0                               # of the file at ``path`` we put there
        self._exhausted_base: dict[int, int] = {}    # id(region) -> its count when superseded

    @property
    def current(self) -> Region:
        """The newest generation's region: new processes map it, the master writes its header."""
        assert self._current is not None, "RegionSet.create() comes first"
        return self._current

    @property
    def open_regions(self) -> tuple[Region, ...]:
        """Every region mapped and not yet closed, oldest first."""
        return tuple(self._open)

    @property
    def generations(self) -> list[int]:
        """The generations that still have a region, oldest first."""
        return sorted(self._by_generation)

    # -- the arbiter's calls ------------------------------------------------------------

    def create(self, generation: int, slots: int, metric_rows: int, endpoint_rows: int) -> None:
        """The first region, created and published under ``path`` (``shm_dir`` must exist)."""
        region = Region.create(self.path, slots, metric_rows, endpoint_rows)
        self._current = region
        self._by_generation[generation] = region
        self._newest = generation
        self._open.append(region)
        self._inode = os.stat(self.path).st_ino

    def begin(self, generation: int, cfg: Config, procs: Collection[Occupant]) -> None:
        """An accepted reload: ``generation`` maps the current region, or a grown copy of it
        when the rows in use or ``cfg`` call for more; either way it becomes current."""
        region = self._region_for(cfg)
        self._by_generation[generation] = region
        self._newest = generation
        self._set_current(region, procs)

    def fall_back(self, generation: int, procs: Collection[Occupant]) -> None:
        """The newest generation failed to boot: ``generation`` (the serving one) is
        current again. The abandoned region stays until its last process is reaped."""
        self._newest = generation
        self._set_current(self._by_generation[generation], procs)

    def serve(self, generation: int, procs: Collection[Occupant]) -> None:
        """``generation`` (the newest) serves: its region becomes the one readers find by
        name, and regions no live generation needs any more are closed."""
        self._publish()
        self._release(procs)
        self._serving = generation

    def sync(self, procs: Collection[Occupant]) -> None:
        """Copy every live process's slot into the other live regions (nothing to do
        unless a reload grew the region and the older generation still runs)."""
        regions = self._live(procs)
        if len(regions) < 2:
            return
        for proc in procs:
            self._copy_slot_out(proc.region, proc.slot, regions)

    def reaped(self, region: Region, slot: int, procs: Collection[Occupant]) -> None:
        """A process that mapped ``region`` was reaped: its slot is freed and its final
        counts (gauges now zero) go into the regions that stay; regions nothing maps any
        more are closed."""
        region.free_slot(slot)
        self._copy_slot_out(region, slot, self._live(procs))
        self._release(procs)

    def unlink_all(self) -> None:
        """At exit: remove the files this master made. Grown regions that never took the
        name go; the file at ``path`` goes only if it is still ours (after a binary
        upgrade it belongs to the new master). Mappings are left to process exit."""
        for region in self._open:
            if region.path != self.path:   # grown, never published
                region.unlink()
        try:
            mine = os.stat(self.path).st_ino == self._inode
        except FileNotFoundError:
            mine = False
        if mine:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # -- inside -------------------------------------------------------------------------

    def _region_for(self, new: Config) -> Region:
        """The region the next generation maps: the current one, or a grown copy of it
        when the rows in use (or the new config) call for more (``shm.grown_rows``). A
        region that cannot be grown is logged and kept: the reload still happens."""
        cur = self.current
        rows = grown_rows(cur.rows, new.metric_rows, cur.rows_used)
        eps = grown_rows(cur.endpoint_rows, new.endpoint_rows, cur.endpoint_rows_used)
        if new.metric_rows < cur.rows or new.endpoint_rows < cur.endpoint_rows:
            log.info("shared memory keeps its %d metric rows and %d endpoint rows (the config "
                     "asks for %d and %d): a region never shrinks", cur.rows, cur.endpoint_rows,
                     new.metric_rows, new.endpoint_rows)
        if (rows, eps) == (cur.rows, cur.endpoint_rows):
            return cur
        try:
            grown = self._grown_copy(cur, rows, eps)
        except (OSError, ShmError) as e:
            log.error("shared memory cannot grow to %d metric rows and %d endpoint rows (%s); "
                      "the next generation keeps %d and %d", rows, eps, e, cur.rows,
                      cur.endpoint_rows)
            return cur
        self._open.append(grown)
        log.info("shared memory grows for the next generation: metric rows %d -> %d (%d in "
                 "use), endpoint rows %d -> %d (%d in use)", cur.rows, rows, cur.rows_used,
                 cur.endpoint_rows, eps, cur.endpoint_rows_used)
        return grown

    def _grown_copy(self, cur: Region, rows: int, endpoint_rows: int) -> Region:
        """A copy of ``cur`` with more rows, at a temporary name until its generation
        serves (``_publish``): until then readers by name keep the serving one."""
        grown = Region.create(self.path, cur.slots, rows, endpoint_rows, publish=False)
        try:
            copy_region(cur, grown)
        except BaseException:
            grown.unlink()
            grown.close()
            raise
        return grown

    def _set_current(self, region: Region, procs: Collection[Occupant]) -> None:
        """New processes go into ``region`` from now on."""
        cur = self.current
        if region is cur:
            return
        self._exhausted_base[id(cur)] = cur.get_u64(OFF_ROWS_EXHAUSTED)
        self._exhausted_base.pop(id(region), None)
        self._current = region
        self.sync(procs)

    def _live(self, procs: Collection[Occupant]) -> list[Region]:
        """The current region, the serving generation's, and any a process still maps."""
        out = [self.current]
        serving = self._by_generation.get(self._serving)
        for region in [serving, *(p.region for p in procs)]:
            if region is not None and all(region is not r for r in out):
                out.append(region)
        return out

    def _copy_slot_out(self, src: Region, slot: int, regions: list[Region]) -> None:
        for dst in regions:
            if dst is not src:
                copy_slot(src, dst, slot)

    def _release(self, procs: Collection[Occupant]) -> None:
        """Forget generations nothing runs in; close the regions nothing maps any more."""
        keep = {self._newest, self._serving}
        keep.update(p.generation for p in procs)
        for gen in [g for g in self._by_generation if g not in keep]:
            del self._by_generation[gen]
        live = self._live(procs)
        for region in [r for r in self._open if all(r is not x for x in live)]:
            self._open.remove(region)
            self._close(region)

    def _close(self, region: Region) -> None:
        cur = self.current
        base = self._exhausted_base.pop(id(region), None)
        if base is not None:   # what its control counted after it was superseded
            cur.add_u64(OFF_ROWS_EXHAUSTED, max(0, region.get_u64(OFF_ROWS_EXHAUSTED) - base))
        if region.path != self.path:
            region.unlink()    # grown for a generation that never served
        log.info("shared memory: closed a %d-row region no process maps any more", region.rows)
        region.close()

    def _publish(self) -> None:
        """The current region becomes the one readers find by name."""
        cur = self.current
        if cur.path == self.path:
            return
        try:
            ours = os.stat(self.path).st_ino == self._inode
        except FileNotFoundError:
            ours = True
        if not ours:   # a binary upgrade's new master owns the name now
            return
        try:
            cur.publish(self.path)
            self._inode = os.stat(self.path).st_ino
        except OSError as e:
            log.error("shared memory: cannot rename %s to %s: %s", cur.path, self.path,
                      e.strerror)
