"""BFS: an NFSv3-like file system as a deterministic replicated state machine.

Every operation is a msgpack array ``[name, [uid, gid, [groups]], args...]`` and every result
``[errno, value]`` (errno 0 on success), computed identically by every correct replica: no clock
(times come from the agreed batch time), no randomness, no host file system. Inode numbers are
handles, as in NFS; a generation number distinguishes reuses of a number.

State: an inode table (regular files, directories, symlinks, FIFOs, sockets and device nodes,
the last three stored as an NFS server stores them: type, mode and device number) with POSIX
attributes, directory entries with stable readdir cookies, and file data in fixed-size blocks, so sparse files
cost only the blocks written. For checkpoints the state is split into partitions: metadata by
inode number, directory entries by (directory, name), data blocks by (inode, block); only
partitions written since the last checkpoint are encoded again, so a create costs the same in a
large directory as in a small one.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import msgpack

ROOT = 1
BLOCK = 16 * 1024
NAME_MAX = 255
SYMLINK_MAX = 4095
META_PARTITIONS = 256
ENTRY_PARTITIONS = 256
DATA_PARTITIONS = 768
ENTRY_BASE = 1 + META_PARTITIONS
DATA_BASE = ENTRY_BASE + ENTRY_PARTITIONS

REG, DIR, LNK, FIFO, SOCK, CHR, BLK = "f", "d", "l", "p", "s", "c", "b"
KIND_BITS = {REG: stat.S_IFREG, DIR: stat.S_IFDIR, LNK: stat.S_IFLNK, FIFO: stat.S_IFIFO,
             SOCK: stat.S_IFSOCK, CHR: stat.S_IFCHR, BLK: stat.S_IFBLK}
SPECIAL = frozenset({FIFO, SOCK, CHR, BLK})  # what mknod makes
SUID_SGID = stat.S_ISUID | stat.S_ISGID
KEEP_MAX = 1024  # open files a mount may name in one remove or rename
WRITEV_EXTENTS_MAX = 65536  # ranges in one writev (the request size bounds their bytes)
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 65536
XATTR_INODE_MAX = 65536 + 4096  # names and values of one inode: one largest value and more
# Extended attribute namespaces: user (the file's readers and writers), trusted (root), security
# (root sets, everyone reads). No system.* (ACLs): EOPNOTSUPP, as a file system without them.
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
READ_ONLY_OPS = frozenset({"getattr", "lookup", "access", "open_read", "readlink", "read", "readdir", "fsstat",
                           "fsinfo", "getxattr", "listxattr"})
R_OK, W_OK, X_OK = 4, 2, 1


class FsError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(errno.errorcode.get(code, str(code)))
        self.code = code


@dataclass(frozen=True, slots=True)
class Limits:
    """The file system's limits, from the ``[bfs]`` table of cluster.toml."""

    bytes_max: int = 1 << 40  # total file data
    inodes_max: int = 1 << 24
    file_bytes_max: int = 1 << 38
    name_max: int = NAME_MAX

    def __post_init__(self) -> None:
        for name in ("bytes_max", "inodes_max", "file_bytes_max", "name_max"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"bfs limit {name} must be a positive integer")
        if self.name_max > NAME_MAX:
            raise ValueError(f"bfs limit name_max cannot exceed {NAME_MAX}")


@dataclass(slots=True)
class Inode:
    ino: int
    kind: str
    mode: int  # permission bits (07777)
    uid: int
    gid: int
    nlink: int
    size: int = 0
    atime: int = 0  # nanoseconds, from the agreed batch time
    mtime: int = 0
    ctime: int = 0
    gen: int = 0
    target: bytes = b""  # symlink
    entries: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # name -> (ino, cookie)
    next_cookie: int = 1
    parent: int = 0  # directories only, for rename loop checks and ".."
    rdev: int = 0  # device nodes only
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    # Not state: an index of a directory's entries by cookie, rebuilt from ``entries`` on decode,
    # so readdir resumes at a cookie by bisection. ``order`` is ascending (cookies only grow) and
    # keeps removed cookies until they are half of it; ``by_cookie`` has the live ones.
    order: list[int] = field(default_factory=list)
    by_cookie: dict[int, bytes] = field(default_factory=dict)

    def attrs(self) -> list:
        return [self.ino, self.kind, self.mode, self.nlink, self.uid, self.gid, self.size,
                self.atime, self.mtime, self.ctime, self.gen, self.rdev]

    def encode(self) -> list:
        """Without the entries, which have partitions of their own."""
        return [self.ino, self.kind, self.mode, self.uid, self.gid, self.nlink, self.size, self.atime,
                self.mtime, self.ctime, self.gen, self.target, self.next_cookie, self.parent, self.rdev,
                sorted(self.xattrs.items())]

    @staticmethod
    def decode(row: list) -> Inode:
        (ino, kind, mode, uid, gid, nlink, size, atime, mtime, ctime, gen, target, next_cookie, parent,
         rdev, xattrs) = row
        node = Inode(ino, kind, mode, uid, gid, nlink, size, atime, mtime, ctime, gen, bytes(target))
        node.next_cookie, node.parent, node.rdev = next_cookie, parent, rdev
        node.xattrs = {bytes(n): bytes(v) for n, v in xattrs}
        return node

    def set_entries(self, rows: list[tuple[int, bytes, int]]) -> None:
        """From (cookie, name, ino) rows, as restored."""
        rows.sort()
        self.entries = {n: (i, c) for c, n, i in rows}
        self.by_cookie = {c: n for c, n, _ in rows}
        self.order = [c for c, _, _ in rows]

    def add_entry(self, name: bytes, ino: int) -> None:
        self.entries[name] = (ino, self.next_cookie)
        self.by_cookie[self.next_cookie] = name
        self.order.append(self.next_cookie)
        self.next_cookie += 1

    def drop_entry(self, name: bytes) -> None:
        _, cookie = self.entries.pop(name)
        del self.by_cookie[cookie]
        if len(self.order) > 2 * len(self.by_cookie) + 16:
            self.order = [c for c in self.order if c in self.by_cookie]

    def entries_after(self, cookie: int, count: int) -> tuple[list[tuple[int, bytes]], bool]:
        """Up to ``count`` live (cookie, name) after ``cookie``, and whether they are the last."""
        out: list[tuple[int, bytes]] = []
        order, live = self.order, self.by_cookie
        i = bisect.bisect_right(order, cookie)
        while i < len(order):
            name = live.get(order[i])
            if name is not None:
                if len(out) == count:
                    return out, False
                out.append((order[i], name))
            i += 1
        return out, True


@dataclass(frozen=True, slots=True)
class Creds:
    uid: int
    gid: int
    groups: frozenset[int]

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


class FileSystem:
    """The BFS service (bft's service interface: execute, is_read_only, partitions, restore)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.inodes: dict[int, Inode] = {}
        self.blocks: dict[tuple[int, int], bytes] = {}
        self.next_ino = ROOT + 1
        self.generation = 0
        self.bytes_used = 0
        self.now = 0
        self.client = 0  # the client whose operation is executing
        # Files unlinked while a mount has them open (nlink 0): inode -> that mount's client id.
        # They keep their data until that mount says the last handle closed ("forget").
        self.orphans: dict[int, int] = {}
        self.inodes[ROOT] = Inode(ROOT, DIR, 0o755, 0, 0, 2, parent=ROOT)
        self._encoded: list[bytes] = [b""] * (DATA_BASE + DATA_PARTITIONS)
        self._dirty: set[int] = set(range(len(self._encoded)))
        # Which inodes or blocks each partition holds, so encoding one costs its own size.
        self._members: list[set] = [set() for _ in self._encoded]
        self._members[_meta_partition(ROOT)].add(ROOT)

    # -- service interface ------------------------------------------------------------------

    def is_read_only(self, op: bytes) -> bool:
        # Only the operation's name is read: the arguments may be large (a write's data).
        unpacker = msgpack.Unpacker(max_buffer_size=len(op) + 1)
        unpacker.feed(op)
        try:
            if unpacker.read_array_header() < 1:
                return False
            name = unpacker.unpack()
        except (ValueError, TypeError, msgpack.OutOfData, msgpack.FormatError, msgpack.StackError):
            return False
        return type(name) is str and name in READ_ONLY_OPS

    def execute(self, op: bytes, client: int, timestamp_ms: int) -> bytes:
        self.now = timestamp_ms * 1_000_000
        self.client = client
        parsed = _parse(op)
        if parsed is None:
            return msgpack.packb([errno.EINVAL, None])
        handler, creds, args = parsed
        # Each handler checks the type and range of every argument it uses and raises FsError
        # before it changes anything; any other exception is a bug of ours, and is not hidden.
        try:
            return msgpack.packb([0, handler(self, creds, *args)])
        except FsError as exc:
            return msgpack.packb([exc.code, None])

    def partitions(self) -> tuple[bytes, ...]:
        """Partition 0: counters; then metadata by inode number; then directory entries by
        (directory, name); then data blocks by (inode, block). Only partitions touched since the
        last call are encoded again."""
        for p in self._dirty:
            if p == 0:
                self._encoded[0] = msgpack.packb([self.next_ino, self.generation, self.bytes_used,
                                                  sorted(self.orphans.items())])
            elif p < ENTRY_BASE:
                members = self._members[p]
                self._encoded[p] = msgpack.packb(sorted(self.inodes[i].encode() for i in members))
            elif p < DATA_BASE:
                rows = sorted([d, n, *self.inodes[d].entries[n]] for d, n in self._members[p])
                self._encoded[p] = msgpack.packb(rows)
            else:
                rows = sorted([k[0], k[1], self.blocks[k]] for k in self._members[p])
                self._encoded[p] = msgpack.packb(rows)
        self._dirty = set()
        return tuple(self._encoded)

    def restore(self, partitions: Sequence[bytes]) -> None:
        if len(partitions) != len(self._encoded):
            raise ValueError(f"a bfs snapshot has {len(self._encoded)} partitions, not {len(partitions)}")
        try:
            self.next_ino, self.generation, self.bytes_used, orphans = msgpack.unpackb(partitions[0])
            self.orphans = {ino: client for ino, client in orphans}
            inodes: dict[int, Inode] = {}
            for part in partitions[1:ENTRY_BASE]:
                for row in msgpack.unpackb(part, max_map_len=0, max_ext_len=0):
                    node = Inode.decode(row)
                    inodes[node.ino] = node
            entries: dict[int, list[tuple[int, bytes, int]]] = {}
            for part in partitions[ENTRY_BASE:DATA_BASE]:
                for d, name, ino, cookie in msgpack.unpackb(part, max_map_len=0, max_ext_len=0):
                    entries.setdefault(d, []).append((cookie, bytes(name), ino))
            for d, rows in entries.items():
                inodes[d].set_entries(rows)
            blocks: dict[tuple[int, int], bytes] = {}
            for part in partitions[DATA_BASE:]:
                for ino, index, block in msgpack.unpackb(part, max_map_len=0, max_ext_len=0):
                    blocks[(ino, index)] = bytes(block)
        except (ValueError, TypeError, KeyError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise ValueError(f"malformed bfs partition: {exc!r}") from None
        if ROOT not in inodes:
            raise ValueError("bfs snapshot without a root directory")
        self.inodes, self.blocks = inodes, blocks
        self._members = [set() for _ in self._encoded]
        for ino, node in inodes.items():
            self._members[_meta_partition(ino)].add(ino)
            for name in node.entries:
                self._members[_entry_partition(ino, name)].add((ino, name))
        for key in blocks:
            self._members[_block_partition(key)].add(key)
        self._encoded = list(partitions)
        self._dirty = set()

    # -- helpers ----------------------------------------------------------------------------

    def _touch_meta(self, node: Inode) -> None:
        self._dirty.add(_meta_partition(node.ino))

    def _touch_block(self, key: tuple[int, int]) -> None:
        p = _block_partition(key)
        self._dirty.add(p)
        if key in self.blocks:
            self._members[p].add(key)
        else:
            self._members[p].discard(key)

    def _node(self, ino: object) -> Inode:
        node = self.inodes.get(ino) if type(ino) is int else None
        if node is None:
            raise FsError(errno.ESTALE)
        return node

    def _regular(self, ino: object) -> Inode:
        node = self._node(ino)
        if node.kind == DIR:
            raise FsError(errno.EISDIR)
        if node.kind != REG:
            raise FsError(errno.EINVAL)
        return node

    def _dir(self, ino: object) -> Inode:
        node = self._node(ino)
        if node.kind != DIR:
            raise FsError(errno.ENOTDIR)
        return node

    def _check(self, creds: Creds, node: Inode, want: int) -> None:
        if creds.uid == 0:
            # root may do anything but execute a file nobody may execute
            if want & X_OK and node.kind != DIR and not node.mode & 0o111:
                raise FsError(errno.EACCES)
            return
        if creds.uid == node.uid:
            bits = (node.mode >> 6) & 7
        elif creds.in_group(node.gid):
            bits = (node.mode >> 3) & 7
        else:
            bits = node.mode & 7
        if want & ~bits:
            raise FsError(errno.EACCES)

    def _check_write(self, creds: Creds, node: Inode) -> None:
        """Write access for writing or truncating a file. The owner may always, as knfsd's
        owner override allows: a program that creates a file read-only and writes it through
        the descriptor it got (git does) must not fail; opening for write was checked at open."""
        if creds.uid != node.uid:
            self._check(creds, node, W_OK)

    def _name(self, name: object) -> bytes:
        if type(name) is not bytes or not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise FsError(errno.EINVAL)
        if len(name) > self.limits.name_max:
            raise FsError(errno.ENAMETOOLONG)
        return name

    def _new_inode(self, creds: Creds, parent: Inode, kind: str, mode: int) -> Inode:
        if len(self.inodes) >= self.limits.inodes_max:
            raise FsError(errno.ENOSPC)
        ino = self.next_ino
        self.next_ino += 1
        self.generation += 1
        gid = parent.gid if parent.mode & stat.S_ISGID else creds.gid
        node = Inode(ino, kind, _uint(mode) & 0o7777, creds.uid, gid, 2 if kind == DIR else 1,
                     atime=self.now, mtime=self.now, ctime=self.now, gen=self.generation)
        self.inodes[ino] = node
        self._members[_meta_partition(ino)].add(ino)
        self._dirty.add(0)
        self._touch_meta(node)
        return node

    def _touch_entry(self, directory: Inode, name: bytes) -> None:
        p = _entry_partition(directory.ino, name)
        self._dirty.add(p)
        if name in directory.entries:
            self._members[p].add((directory.ino, name))
        else:
            self._members[p].discard((directory.ino, name))

    def _unlink_entry(self, directory: Inode, name: bytes) -> None:
        directory.drop_entry(name)
        self._touch_entry(directory, name)

    def _link_entry(self, directory: Inode, name: bytes, ino: int) -> None:
        directory.add_entry(name, ino)
        self._touch_entry(directory, name)
        directory.mtime = directory.ctime = self.now
        self._touch_meta(directory)

    def _prepare_create(self, creds: Creds, dir_ino: object, name: object) -> tuple[Inode, bytes]:
        directory = self._dir(dir_ino)
        name = self._name(name)
        self._check(creds, directory, W_OK | X_OK)
        if name in directory.entries:
            raise FsError(errno.EEXIST)
        return directory, name

    def _sticky_denied(self, creds: Creds, directory: Inode, node: Inode) -> bool:
        return bool(directory.mode & stat.S_ISVTX) and creds.uid not in (0, directory.uid, node.uid)

    def _drop_link(self, node: Inode, keep: frozenset[int] = frozenset()) -> int | None:
        """One name fewer; at none the inode goes, unless it is a file in ``keep`` (the calling
        mount has it open): then it stays, nameless, until that mount forgets it. Returns the
        inode number kept so."""
        node.nlink -= 1
        node.ctime = self.now
        self._touch_meta(node)
        if node.nlink <= 0 and node.kind != DIR and node.ino in keep:
            self.orphans[node.ino] = self.client
            self._dirty.add(0)
            return node.ino
        if node.nlink <= 0 or (node.kind == DIR and node.nlink <= 1):
            self._free(node)
        return None

    def _free(self, node: Inode) -> None:
        self._touch_meta(node)
        self._truncate(node, 0)
        del self.inodes[node.ino]
        self._members[_meta_partition(node.ino)].discard(node.ino)
        if self.orphans.pop(node.ino, None) is not None:
            self._dirty.add(0)

    @staticmethod
    def _keep(keep: object) -> frozenset[int]:
        if type(keep) is not list or len(keep) > KEEP_MAX or not all(_is_uint(i) for i in keep):
            raise FsError(errno.EINVAL)
        return frozenset(keep)

    def _truncate(self, node: Inode, size: int) -> None:
        if size < node.size:
            first = (size + BLOCK - 1) // BLOCK
            for index in range(first, (node.size + BLOCK - 1) // BLOCK):
                block = self.blocks.pop((node.ino, index), None)
                if block is not None:
                    self.bytes_used -= len(block)
                    self._touch_block((node.ino, index))
            if size % BLOCK:
                key = (node.ino, size // BLOCK)
                block = self.blocks.get(key)
                if block is not None and len(block) > size % BLOCK:
                    self.bytes_used -= len(block) - size % BLOCK
                    self.blocks[key] = block[: size % BLOCK]
                    self._touch_block(key)
        node.size = size
        self._dirty.add(0)

    # -- operations (NFSv3 names) -----------------------------------------------------------

    def op_getattr(self, creds: Creds, ino: object) -> list:
        return self._node(ino).attrs()

    def op_setattr(self, creds: Creds, ino: object, changes: list) -> list:
        """``changes`` is [mode, uid, gid, size, atime, mtime] and, optionally, a seventh: true
        when a truncation comes through a handle open for writing (ftruncate), which gets the
        owner override that writes get; nil where unchanged; a time of -1 means "now" (the
        agreed time). Everything is checked before anything changes, so a refused setattr
        changes nothing."""
        node = self._node(ino)
        if type(changes) is not list or len(changes) not in (6, 7):
            raise FsError(errno.EINVAL)
        mode, uid, gid, size, atime, mtime = changes[:6]
        through_handle = changes[6:] == [True]
        owner = creds.uid in (0, node.uid)
        if mode is not None:
            mode = _uint(mode) & 0o7777
            if not owner:
                # Only the kernel's "clear setuid/setgid" before a write or truncation, which
                # comes with the writer's credentials; the writer needs write permission.
                if mode == node.mode or mode & ~node.mode or (mode ^ node.mode) & ~SUID_SGID:
                    raise FsError(errno.EPERM)
                self._check(creds, node, W_OK)
        if uid is not None and creds.uid != 0 and (_uint(uid) != node.uid or creds.uid != node.uid):
            raise FsError(errno.EPERM)  # only root gives a file away; a non-owner changes nothing
        if gid is not None and creds.uid != 0:
            gid = _uint(gid)
            if creds.uid != node.uid or (gid != node.gid and not creds.in_group(gid)):
                raise FsError(errno.EPERM)
        if size is not None:
            size = _uint(size)
            self._regular(ino)
            if through_handle:
                self._check_write(creds, node)
            else:
                self._check(creds, node, W_OK)  # truncate(path) and O_TRUNC: the mode decides
            if size > self.limits.file_bytes_max:
                raise FsError(errno.EFBIG)
            if size > node.size and self.bytes_used > self.limits.bytes_max:
                raise FsError(errno.ENOSPC)
        times = []
        for value, attr in ((atime, "atime"), (mtime, "mtime")):
            if value is None:
                continue
            if type(value) is not int or not -1 <= value < 1 << 63:
                raise FsError(errno.EINVAL)
            if not owner:
                # only "set to now" is allowed to writers who do not own the file
                if value != -1:
                    raise FsError(errno.EPERM)
                self._check(creds, node, W_OK)
            times.append((attr, self.now if value == -1 else value))
        if mode is not None:
            node.mode = mode
            if creds.uid != 0 and not creds.in_group(node.gid):
                node.mode &= ~stat.S_ISGID
        if (uid is not None and uid != node.uid) or (gid is not None and gid != node.gid):
            node.uid = node.uid if uid is None else uid
            node.gid = node.gid if gid is None else gid
            if node.kind != DIR:
                node.mode &= ~(stat.S_ISUID | stat.S_ISGID)  # as Linux does on chown
        if size is not None:
            self._truncate(node, size)
            node.mtime = self.now
        for attr, value in times:
            setattr(node, attr, value)
        node.ctime = self.now
        self._touch_meta(node)
        return node.attrs()

    def op_lookup(self, creds: Creds, dir_ino: object, name: object) -> list:
        directory = self._dir(dir_ino)
        self._check(creds, directory, X_OK)
        if name == b".":
            return directory.attrs()
        if name == b"..":
            return self.inodes[directory.parent].attrs()
        entry = directory.entries.get(name) if type(name) is bytes else None
        if entry is None:
            if type(name) is bytes and len(name) > self.limits.name_max:
                raise FsError(errno.ENAMETOOLONG)
            raise FsError(errno.ENOENT)
        return self.inodes[entry[0]].attrs()

    def op_access(self, creds: Creds, ino: object, mask: object) -> list:
        """The attributes, once allowed: a mount opening a file learns them without a getattr."""
        node = self._node(ino)
        self._check(creds, node, _uint(mask) & 7)
        return node.attrs()

    def op_open_read(self, creds: Creds, ino: object, count: object) -> list:
        """An open for reading: ``access`` and the file's first ``count`` bytes in one answer, as
        an NFS READ returns the attributes with the data (the open's revalidation and the first
        read, which follows most opens, cost one round instead of two)."""
        attrs = self.op_access(creds, ino, R_OK)
        if self._node(ino).kind != REG:
            return [attrs, b"", False]  # nothing read: the mount asks as it would have
        return [attrs, *self.op_read(creds, ino, 0, count)]

    def op_readlink(self, creds: Creds, ino: object) -> bytes:
        node = self._node(ino)
        if node.kind != LNK:
            raise FsError(errno.EINVAL)
        return node.target

    def op_read(self, creds: Creds, ino: object, offset: object, count: object) -> list:
        node = self._regular(ino)
        self._check(creds, node, R_OK)
        offset, count = _uint(offset), min(_uint(count), 1 << 24)
        end = min(node.size, offset + count)
        out = bytearray()
        for index, within, take, _ in _spans(offset, end):
            chunk = self.blocks.get((node.ino, index), b"")[within:within + take]
            out += chunk + bytes(take - len(chunk))  # holes read as zeros
        return [bytes(out), end >= node.size]

    def op_write(self, creds: Creds, ino: object, offset: object, data: object) -> list:
        return self.op_writev(creds, ino, [[offset, data]])

    def op_writev(self, creds: Creds, ino: object, extents: object) -> list:
        """Write ``[[offset, data], ...]`` in order, all or nothing (a mount's cached writes of
        one file); returns the attributes after them."""
        node = self._regular(ino)
        if type(extents) is not list or not extents or len(extents) > WRITEV_EXTENTS_MAX:
            raise FsError(errno.EINVAL)
        for extent in extents:
            if type(extent) is not list or len(extent) != 2 or type(extent[1]) is not bytes:
                raise FsError(errno.EINVAL)
            _uint(extent[0])
        self._check_write(creds, node)
        if max(o + len(d) for o, d in extents) > self.limits.file_bytes_max:
            raise FsError(errno.EFBIG)
        extents = [(o, d) for o, d in extents if d]
        if not extents:
            return node.attrs()
        # Check the space first: a refused write must change nothing. Growth is counted per
        # block, the largest length each block reaches over all the extents.
        reach: dict[int, int] = {}
        for offset, data in extents:
            for index, within, take, _ in _spans(offset, offset + len(data)):
                reach[index] = max(reach.get(index, 0), within + take)
        growth = sum(max(0, n - len(self.blocks.get((node.ino, i), b""))) for i, n in reach.items())
        if self.bytes_used + growth > self.limits.bytes_max:
            raise FsError(errno.ENOSPC)
        for offset, data in extents:
            for index, within, take, pos in _spans(offset, offset + len(data)):
                key = (node.ino, index)
                old = self.blocks.get(key, b"")
                new = bytearray(old) + bytes(max(0, within - len(old)))
                new[within:within + take] = data[pos - offset:pos - offset + take]
                self.blocks[key] = bytes(new)
                self.bytes_used += len(new) - len(old)
                self._touch_block(key)
            node.size = max(node.size, offset + len(data))
        node.mtime = node.ctime = self.now
        if creds.uid != 0:
            node.mode &= ~(stat.S_ISUID | stat.S_ISGID)
        self._dirty.add(0)
        self._touch_meta(node)
        return node.attrs()

    def op_create(self, creds: Creds, dir_ino: object, name: object, mode: object, exclusive: object) -> list:
        """The file's attributes; 13th, whether it is new (a mount then knows it has no extended
        attributes); 14th, the directory's attributes after (NFSv3's post-operation attributes:
        the mount need not ask for them). A file already there is opened for writing."""
        return self._create(creds, dir_ino, name, mode, exclusive, None, False)

    def op_create_open(self, creds: Creds, dir_ino: object, name: object, mode: object, exclusive: object,
                       mask: object, truncate: object) -> list:
        """``create`` as an ``open(O_CREAT)``: a file already there (made since the mount last
        looked: the kernel found no such name, so it checked nothing) is opened with the open's
        own checks, ``mask`` (R_OK, W_OK or both), and truncated for O_TRUNC as ``setattr`` of
        size 0 by path is, in the same operation."""
        if type(truncate) is not bool or _uint(mask) & ~(R_OK | W_OK) or not _uint(mask):
            raise FsError(errno.EINVAL)
        return self._create(creds, dir_ino, name, mode, exclusive, _uint(mask), truncate)

    def _create(self, creds: Creds, dir_ino: object, name: object, mode: object, exclusive: object,
                mask: int | None, truncate: bool) -> list:
        directory = self._dir(dir_ino)
        self._check(creds, directory, X_OK)
        entry = directory.entries.get(name) if type(name) is bytes else None
        if entry is not None:
            if exclusive:
                raise FsError(errno.EEXIST)
            node = self.inodes[entry[0]]
            if node.kind == DIR:
                raise FsError(errno.EISDIR)
            if mask is None:
                self._check_write(creds, node)
            else:
                self._check(creds, node, mask)
            if truncate and node.kind == REG:  # as Linux, O_TRUNC of a FIFO or device is ignored
                return [*self.op_setattr(creds, node.ino, [None, None, None, 0, None, None]), False, directory.attrs()]
            return [*node.attrs(), False, directory.attrs()]
        directory, name = self._prepare_create(creds, dir_ino, name)
        node = self._new_inode(creds, directory, REG, _uint(mode))
        self._link_entry(directory, name, node.ino)
        return [*node.attrs(), True, directory.attrs()]

    def op_mkdir(self, creds: Creds, dir_ino: object, name: object, mode: object) -> list:
        directory, name = self._prepare_create(creds, dir_ino, name)
        node = self._new_inode(creds, directory, DIR, _uint(mode))
        node.parent = directory.ino
        if directory.mode & stat.S_ISGID:
            node.mode |= stat.S_ISGID
        directory.nlink += 1
        self._link_entry(directory, name, node.ino)
        return [*node.attrs(), directory.attrs()]  # and the directory's after, as create

    def op_symlink(self, creds: Creds, dir_ino: object, name: object, target: object) -> list:
        if type(target) is not bytes or not target or len(target) > SYMLINK_MAX:
            raise FsError(errno.ENAMETOOLONG if type(target) is bytes and target else errno.EINVAL)
        directory, name = self._prepare_create(creds, dir_ino, name)
        node = self._new_inode(creds, directory, LNK, 0o777)
        node.target = target
        node.size = len(target)
        self._link_entry(directory, name, node.ino)
        return node.attrs()

    def op_mknod(self, creds: Creds, dir_ino: object, name: object, kind: object, mode: object,
                 rdev: object) -> list:
        """A FIFO, a UNIX socket's name, or a device node: stored, never opened here (the
        client's kernel does that)."""
        if type(kind) is not str or kind not in SPECIAL:
            raise FsError(errno.EINVAL)
        rdev = _uint(rdev) if kind in (CHR, BLK) else 0
        if kind in (CHR, BLK) and creds.uid != 0:
            raise FsError(errno.EPERM)
        directory, name = self._prepare_create(creds, dir_ino, name)
        node = self._new_inode(creds, directory, kind, _uint(mode))
        node.rdev = rdev
        self._link_entry(directory, name, node.ino)
        return node.attrs()

    def _unlink_checks(self, creds: Creds, dir_ino: object, name: object) -> tuple[Inode, bytes, Inode]:
        directory = self._dir(dir_ino)
        name = self._name(name)
        self._check(creds, directory, W_OK | X_OK)
        entry = directory.entries.get(name)
        if entry is None:
            raise FsError(errno.ENOENT)
        node = self.inodes[entry[0]]
        if self._sticky_denied(creds, directory, node):
            raise FsError(errno.EPERM)
        return directory, name, node

    def op_remove(self, creds: Creds, dir_ino: object, name: object, keep: object) -> int | None:
        """Unlink; ``keep`` lists the files the calling mount has open (see _drop_link)."""
        keep = self._keep(keep)
        directory, name, node = self._unlink_checks(creds, dir_ino, name)
        if node.kind == DIR:
            raise FsError(errno.EISDIR)
        self._unlink_entry(directory, name)
        directory.mtime = directory.ctime = self.now
        self._touch_meta(directory)
        return self._drop_link(node, keep)

    def op_rmdir(self, creds: Creds, dir_ino: object, name: object) -> None:
        directory, name, node = self._unlink_checks(creds, dir_ino, name)
        if node.kind != DIR:
            raise FsError(errno.ENOTDIR)
        if node.entries:
            raise FsError(errno.ENOTEMPTY)
        self._unlink_entry(directory, name)
        directory.nlink -= 1
        directory.mtime = directory.ctime = self.now
        self._touch_meta(directory)
        node.nlink = 0
        self._drop_link(node)

    def op_rename(self, creds: Creds, src_dir: object, src_name: object, dst_dir: object, dst_name: object,
                  keep: object) -> int | None:
        """Rename; ``keep`` as for remove, for a file renamed over."""
        keep = self._keep(keep)
        source, src_name, node = self._unlink_checks(creds, src_dir, src_name)
        target_dir = self._dir(dst_dir)
        dst_name = self._name(dst_name)
        self._check(creds, target_dir, W_OK | X_OK)
        if node.kind == DIR:
            if source.ino != target_dir.ino:
                self._check(creds, node, W_OK)  # its ".." entry changes
            # refuse to move a directory into its own subtree
            walk = target_dir.ino
            while True:
                if walk == node.ino:
                    raise FsError(errno.EINVAL)
                if walk == ROOT:
                    break
                walk = self.inodes[walk].parent
        existing = target_dir.entries.get(dst_name)
        if existing is not None:
            victim = self.inodes[existing[0]]
            if victim.ino == node.ino:
                return None
            if self._sticky_denied(creds, target_dir, victim):
                raise FsError(errno.EPERM)
            if node.kind == DIR and victim.kind != DIR:
                raise FsError(errno.ENOTDIR)
            if node.kind != DIR and victim.kind == DIR:
                raise FsError(errno.EISDIR)
            if victim.kind == DIR and victim.entries:
                raise FsError(errno.ENOTEMPTY)
            self._unlink_entry(target_dir, dst_name)
            if victim.kind == DIR:
                target_dir.nlink -= 1
                victim.nlink = 0
            kept = self._drop_link(victim, keep)
        else:
            kept = None
        self._unlink_entry(source, src_name)
        source.mtime = source.ctime = self.now
        self._touch_meta(source)
        self._link_entry(target_dir, dst_name, node.ino)
        if node.kind == DIR and source.ino != target_dir.ino:
            node.parent = target_dir.ino
            source.nlink -= 1
            target_dir.nlink += 1
        node.ctime = self.now
        self._touch_meta(node)
        return kept

    def op_link(self, creds: Creds, ino: object, dir_ino: object, name: object) -> list:
        node = self._node(ino)
        if node.kind == DIR:
            raise FsError(errno.EPERM)
        directory, name = self._prepare_create(creds, dir_ino, name)
        node.nlink += 1
        node.ctime = self.now
        self._touch_meta(node)
        self._link_entry(directory, name, node.ino)
        return node.attrs()

    def op_readdir(self, creds: Creds, dir_ino: object, cookie: object, count: object) -> list:
        """Entries after ``cookie``, in cookie order: [[name, attrs, cookie], ...], eof."""
        directory = self._dir(dir_ino)
        self._check(creds, directory, R_OK)
        cookie, count = _uint(cookie), max(1, min(_uint(count), 4096))
        page, eof = directory.entries_after(cookie, count)
        entries = directory.entries
        return [[[n, self.inodes[entries[n][0]].attrs(), c] for c, n in page], eof]

    def op_fsstat(self, creds: Creds) -> list:
        lim = self.limits
        return [lim.bytes_max, max(0, lim.bytes_max - self.bytes_used), lim.inodes_max,
                max(0, lim.inodes_max - len(self.inodes)), BLOCK]

    def op_fsinfo(self, creds: Creds) -> list:
        return [BLOCK, 1 << 20, 1 << 20, self.limits.file_bytes_max, self.limits.name_max]

    def op_forget(self, creds: Creds, ino: object) -> int:
        """The calling mount closed its last handle on a file it kept open past its unlink."""
        if type(ino) is int and self.orphans.get(ino) == self.client:
            self._free(self.inodes[ino])
        return 0

    def op_reclaim(self, creds: Creds) -> int:
        """A mount starting: free what its previous run (same client id) kept and never forgot."""
        mine = sorted(i for i, c in self.orphans.items() if c == self.client)
        for ino in mine:
            self._free(self.inodes[ino])
        return len(mine)

    def _xattr(self, creds: Creds, ino: object, name: object, write: bool) -> tuple[Inode, bytes]:
        """The inode and attribute name, after Linux's checks for reading or writing it."""
        node = self._node(ino)
        if type(name) is not bytes or not name or b"\0" in name:
            raise FsError(errno.EINVAL)
        if len(name) > XATTR_NAME_MAX:
            raise FsError(errno.ERANGE)
        if not name.startswith(XATTR_NAMESPACES) or name in XATTR_NAMESPACES:
            raise FsError(errno.EOPNOTSUPP)
        if name.startswith(b"trusted.") or (write and name.startswith(b"security.")):
            if creds.uid != 0:  # others cannot see trusted.* at all
                raise FsError(errno.EPERM if write else errno.ENODATA)
        elif name.startswith(b"user."):
            if node.kind not in (REG, DIR):
                raise FsError(errno.EPERM if write else errno.ENODATA)
            if write and node.kind == DIR and self._sticky_denied(creds, node, node):
                raise FsError(errno.EPERM)  # a sticky directory's user attributes are its owner's
            self._check(creds, node, W_OK if write else R_OK)
        return node, name

    def op_getxattr(self, creds: Creds, ino: object, name: object) -> bytes:
        node, name = self._xattr(creds, ino, name, write=False)
        value = node.xattrs.get(name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def op_listxattr(self, creds: Creds, ino: object) -> list[bytes]:
        node = self._node(ino)
        return sorted(n for n in node.xattrs if creds.uid == 0 or not n.startswith(b"trusted."))

    def op_setxattr(self, creds: Creds, ino: object, name: object, value: object) -> None:
        node, name = self._xattr(creds, ino, name, write=True)
        if type(value) is not bytes:
            raise FsError(errno.EINVAL)
        if len(value) > XATTR_VALUE_MAX:
            raise FsError(errno.E2BIG)
        old = node.xattrs.get(name)
        held = sum(len(n) + len(v) for n, v in node.xattrs.items())
        if held - (len(name) + len(old) if old is not None else 0) + len(name) + len(value) > XATTR_INODE_MAX:
            raise FsError(errno.ENOSPC)
        node.xattrs[name] = value
        node.ctime = self.now
        self._touch_meta(node)

    def op_removexattr(self, creds: Creds, ino: object, name: object) -> None:
        node, name = self._xattr(creds, ino, name, write=True)
        if node.xattrs.pop(name, None) is None:
            raise FsError(errno.ENODATA)
        node.ctime = self.now
        self._touch_meta(node)

    def op_commit(self, creds: Creds, ino: object) -> int:
        self._node(ino)
        return 0  # every write is committed when its reply is agreed (a mount's cache is its own)


def _is_uint(v: object) -> bool:
    return type(v) is int and 0 <= v < 1 << 63


def _uint(v: object) -> int:
    if not _is_uint(v):
        raise FsError(errno.EINVAL)
    return v


def decode_result(result: bytes) -> tuple[int, object] | None:
    """An answer as ``execute`` gives it, ``(errno, value)``; None for anything else (a cluster
    running another service)."""
    try:
        reply = msgpack.unpackb(result)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if type(reply) is not list or len(reply) != 2 or type(reply[0]) is not int or reply[0] < 0:
        return None
    return reply[0], reply[1]


def _parse(op: bytes) -> tuple[Callable[..., object], Creds, list] | None:
    """An operation's handler, credentials and arguments; None unless it is an array of a known
    name, ``[uid, gid, [groups]]`` and exactly the arguments that operation takes."""
    try:
        args = msgpack.unpackb(op, max_map_len=0, max_ext_len=0, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if type(args) is not list or len(args) < 2 or type(args[0]) is not str or args[0] not in _OPS:
        return None
    name, who, *rest = args
    if len(rest) != _ARITY[name] or type(who) is not list or len(who) != 3 or type(who[2]) is not list:
        return None
    uid, gid, groups = who[0], who[1], who[2][:32]
    if not all(_is_uint(v) for v in (uid, gid, *groups)):
        return None
    return _OPS[name], Creds(uid, gid, frozenset(groups)), rest


def _spans(offset: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """The pieces of bytes [offset, end) by block: (block, offset in it, length, file offset)."""
    pos = offset
    while pos < end:
        index, within = divmod(pos, BLOCK)
        take = min(BLOCK - within, end - pos)
        yield index, within, take, pos
        pos += take


def _meta_partition(ino: int) -> int:
    return 1 + ino % META_PARTITIONS


def _entry_partition(directory: int, name: bytes) -> int:
    h = hashlib.blake2b(b"%d/%s" % (directory, name), digest_size=4).digest()
    return ENTRY_BASE + int.from_bytes(h, "big") % ENTRY_PARTITIONS


def _block_partition(key: tuple[int, int]) -> int:
    h = hashlib.blake2b(b"%d:%d" % key, digest_size=4).digest()
    return DATA_BASE + int.from_bytes(h, "big") % DATA_PARTITIONS


_OPS = {name[3:]: fn for name, fn in vars(FileSystem).items() if name.startswith("op_")}
# The arguments each operation takes after (self, creds); no handler has defaults or *args.
_ARITY = {name: fn.__code__.co_argcount - 2 for name, fn in _OPS.items()}
