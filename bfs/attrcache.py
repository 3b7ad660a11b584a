"""What a mount knows of attributes without asking the replicas, as an NFS client's attribute
cache: the attributes every reply carries, kept for the mount's attribute timeout; the extended
attributes a file was found not to have (the kernel asks for ``security.capability`` before every
write); and the names of directories listed or made here, so that a name not among them is "not
found" without asking, for as long as the kernel keeps a name it looked up and did not find
(compilers look for many files that are not there). The kernel caches attributes for the same
time, but forgets them after each write through it; answering those getattrs here saves a round
of replies each.

The clock is passed in: ``now`` is ``time.monotonic()`` in the mount, anything in tests.
"""

from __future__ import annotations

ENTRIES_MAX = 65536  # per table; past it a table starts again empty (only costs some asking)
# Directories whose names are kept, and names kept of one (a longer directory's are not): at
# most 65,536 names, some 20 MB if every one is 255 bytes long.
LISTINGS_MAX = 64
NAMES_MAX = 1024


class AttrCache:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.fresh: dict[int, tuple[list, float]] = {}  # inode -> (attributes, when received)
        # inode -> (size, mtime) as the kernel was last told, to see another mount's change
        self.seen: dict[int, tuple[int, int]] = {}
        self.no_xattr: dict[tuple[int, bytes | None], float] = {}  # (inode, name) -> when found absent
        # Files whose write-back the replicas refused since their last open here: the kernel's
        # pages of them hold the refused bytes whatever the attributes say (insertion order).
        self.refused: dict[int, None] = {}
        # directory inode -> (the names it holds, when they were asked for)
        self.listings: dict[int, tuple[set[bytes], float]] = {}

    def note(self, attrs: list, now: float) -> None:
        """Attributes from a reply (``bfs.fs.Inode.attrs``: inode first, size 7th, mtime 9th)."""
        if len(self.fresh) >= ENTRIES_MAX:
            self.fresh.clear()
        self.fresh[attrs[0]] = (attrs, now)

    def told(self, attrs: list) -> None:
        """Attributes handed to the kernel."""
        if len(self.seen) >= ENTRIES_MAX:
            self.seen.clear()
        self.seen[attrs[0]] = (attrs[6], attrs[8])

    def get(self, ino: int, now: float) -> tuple[list, float] | None:
        """The attributes and the seconds they stay fresh, if they still do."""
        hit = self.fresh.get(ino)
        if hit is None or now - hit[1] >= self.timeout_s:
            return None
        return hit[0], self.timeout_s - (now - hit[1])

    def stale(self, attrs: list) -> bool:
        """At an open: whether the kernel's cached pages of the file may be out of date, as
        NFSv3 clients judge theirs (size or mtime differ from what the kernel was last told), or
        hold bytes the replicas refused (once: this open drops them)."""
        if attrs[0] in self.refused:
            del self.refused[attrs[0]]
            return True
        return self.seen.get(attrs[0]) != (attrs[6], attrs[8])

    def distrust(self, ino: int) -> None:
        """The kernel's pages of this file hold writes the replicas refused."""
        if len(self.refused) >= ENTRIES_MAX:
            del self.refused[next(iter(self.refused))]
        self.refused[ino] = None

    def drop(self, *inos: int) -> None:
        """These inodes changed in ways their replies did not show (a directory's entries)."""
        for ino in inos:
            self.fresh.pop(ino, None)

    def drop_all(self) -> None:
        """A remove or rename: some inode not named in it lost a link, and names moved (the
        directories' names are dropped rather than edited)."""
        self.fresh.clear()
        self.listings.clear()

    def listed(self, dir_ino: int, names: list[bytes], asked: float) -> None:
        """Every name of the directory, as the replicas answered a readdir (or a mkdir, none)
        sent at ``asked``."""
        if len(self.listings) >= LISTINGS_MAX:
            self.listings.clear()
        if len(names) <= NAMES_MAX:
            self.listings[dir_ino] = (set(names), asked)

    def named(self, dir_ino: int, name: bytes) -> None:
        """This mount is making ``name`` in the directory (taken before it asks: a name that
        turns out not to exist only costs a lookup)."""
        hit = self.listings.get(dir_ino)
        if hit is not None:
            hit[0].add(name)
            if len(hit[0]) > NAMES_MAX:
                del self.listings[dir_ino]

    def missing(self, dir_ino: int, name: bytes, now: float) -> float | None:
        """The seconds ``name`` may be taken as not in the directory, if its names are known."""
        hit = self.listings.get(dir_ino)
        if hit is None or name in hit[0]:
            return None
        left = self.timeout_s - (now - hit[1])
        return left if left > 0 else None

    def xattr_absent(self, ino: int, name: bytes, now: float) -> bool:
        when = self.no_xattr.get((ino, name), self.no_xattr.get((ino, None)))
        return when is not None and now - when < self.timeout_s

    def note_no_xattr(self, ino: int, name: bytes | None, now: float) -> None:
        """``name`` None: the file has none at all (this mount just created it)."""
        if len(self.no_xattr) >= ENTRIES_MAX:
            self.no_xattr.clear()
        self.no_xattr[(ino, name)] = now

    def drop_xattrs(self, ino: int) -> None:
        for key in [k for k in self.no_xattr if k[0] == ino]:
            del self.no_xattr[key]
