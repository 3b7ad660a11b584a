"""The BFS state machine driven directly (the mount comes with the file-system issue)."""

from __future__ import annotations

import errno

import msgpack
import pytest

from bfs.fs import BLOCK, DIR, LNK, REG, ROOT, FileSystem, Limits
from bft.core.clients import ClientTable
from bft.core.state import capture, rebuild

ROOT_CREDS = [0, 0, []]
ALICE = [1000, 1000, [1000]]
BOB = [1001, 1001, []]


class Fs:
    def __init__(self, limits: Limits | None = None) -> None:
        self.fs = FileSystem(limits)
        self.time = 1_000

    def __call__(self, name: str, *args: object, who: list = ROOT_CREDS) -> object:
        self.time += 1
        code, value = msgpack.unpackb(self.fs.execute(msgpack.packb([name, who, *args]), 0, self.time))
        if code:
            raise OSError(code, errno.errorcode[code])
        return value

    def err(self, name: str, *args: object, who: list = ROOT_CREDS) -> int:
        with pytest.raises(OSError) as exc:
            self(name, *args, who=who)
        return exc.value.errno


def ino(attrs: list) -> int:
    return attrs[0]


def observe(service: FileSystem) -> dict[bytes, object]:
    """Everything a client can see of a file system, found by walking it from the root with
    getattr, readdir, read and readlink (and fsstat): each path's attributes with a file's data,
    a symlink's target, or a directory's entries and their readdir cookies."""

    def call(name: str, *args: object) -> object:
        code, value = msgpack.unpackb(service.execute(msgpack.packb([name, ROOT_CREDS, *args]), 0, 0))
        assert code == 0, f"{name}{args}: {errno.errorcode[code]}"
        return value

    seen: dict[bytes, object] = {b"(fsstat)": call("fsstat")}
    todo = [(b"", ROOT)]
    while todo:
        path, node = todo.pop()
        attrs = call("getattr", node)
        if attrs[1] == DIR:
            entries, cookie, eof = [], 0, False
            while not eof:
                page, eof = call("readdir", node, cookie, 7)  # several pages: cookies must carry on
                entries += page
                cookie = page[-1][2] if page else cookie
            content: object = entries
            todo += [(path + b"/" + name, entry_attrs[0]) for name, entry_attrs, _ in entries]
        elif attrs[1] == LNK:
            content = call("readlink", node)
        elif attrs[1] == REG:
            content = call("read", node, 0, attrs[6] + 1)
        else:
            content = None
        seen[path] = (attrs, content)
    return seen


def populated() -> Fs:
    """A file system with something of every kind: nested directories, files of several blocks,
    a sparse one, a hard link, a symlink, a FIFO, another owner's file, a rename and a removal."""
    fs = Fs()
    d = ino(fs("mkdir", ROOT, b"d", 0o755))
    sub = ino(fs("mkdir", d, b"sub", 0o700))
    for i in range(12):
        f = ino(fs("create", d if i % 2 else sub, b"f%d" % i, 0o644, False))
        fs("write", f, 0, bytes([i]) * (i * 5_000 + 1))
    sparse = ino(fs("create", ROOT, b"sparse", 0o600, False))
    fs("write", sparse, 5 * BLOCK + 3, b"end")
    fs("link", sparse, d, b"hard")
    fs("symlink", ROOT, b"ln", b"d/sub/f0")
    fs("mknod", ROOT, b"fifo", "p", 0o600, 0)
    fs("setattr", d, [0o777, None, None, None, None, None])
    mine = ino(fs("create", d, b"alice", 0o640, False, who=ALICE))
    fs("write", mine, 0, b"hers", who=ALICE)
    fs("rename", d, b"f1", ROOT, b"moved", [])
    fs("remove", d, b"f3", [])
    return fs


def test_create_write_read_and_sparse_files() -> None:
    fs = Fs()
    f = ino(fs("create", ROOT, b"a.txt", 0o644, False))
    fs("write", f, 0, b"hello")
    assert fs("read", f, 0, 100) == [b"hello", True]
    fs("write", f, 3 * BLOCK + 10, b"tail")  # a hole of three blocks
    data, eof = fs("read", f, 0, 4 * BLOCK)
    assert eof and len(data) == 3 * BLOCK + 14 and data[5:3 * BLOCK + 10] == bytes(3 * BLOCK + 5)
    assert len(fs.fs.blocks) == 2  # the hole costs nothing
    assert fs("getattr", f)[6] == 3 * BLOCK + 14
    fs("setattr", f, [None, None, None, 2, None, None])  # truncate
    assert fs("read", f, 0, 100) == [b"he", True]
    assert fs.err("create", ROOT, b"a.txt", 0o644, True) == errno.EEXIST


def test_directories_rename_link_symlink_and_errors() -> None:
    fs = Fs()
    d = ino(fs("mkdir", ROOT, b"d", 0o755))
    sub = ino(fs("mkdir", d, b"sub", 0o755))
    f = ino(fs("create", d, b"f", 0o644, False))
    assert fs("getattr", d)[3] == 3  # nlink: ".", its entry, and sub's ".."
    assert fs.err("rmdir", ROOT, b"d") == errno.ENOTEMPTY
    assert fs.err("rename", ROOT, b"d", sub, b"x", []) == errno.EINVAL  # into its own subtree
    fs("rename", d, b"f", ROOT, b"moved", [])
    assert fs.err("lookup", d, b"f") == errno.ENOENT
    assert ino(fs("lookup", ROOT, b"moved")) == f
    fs("link", f, d, b"hard")
    assert fs("getattr", f)[3] == 2
    fs("remove", ROOT, b"moved", [])
    assert fs("getattr", f)[3] == 1
    link = ino(fs("symlink", ROOT, b"ln", b"d/hard"))
    assert fs("readlink", link) == b"d/hard"
    assert fs.err("remove", ROOT, b"d", []) == errno.EISDIR
    assert fs.err("rmdir", d, b"hard") == errno.ENOTDIR
    assert fs.err("lookup", ROOT, b"x" * 256) == errno.ENAMETOOLONG
    assert fs.err("create", ROOT, b"x" * 256, 0o644, False) == errno.ENAMETOOLONG
    assert fs.err("getattr", 999) == errno.ESTALE
    fs("mknod", ROOT, b"fifo", "p", 0o600, 0)
    assert fs("lookup", ROOT, b"fifo")[1] == "p"
    # rename over an existing file replaces it
    a = ino(fs("create", ROOT, b"a", 0o644, False))
    fs("create", ROOT, b"b", 0o644, False)
    fs("rename", ROOT, b"a", ROOT, b"b", [])
    assert ino(fs("lookup", ROOT, b"b")) == a


def test_permissions_follow_the_callers_credentials() -> None:
    fs = Fs()
    home = ino(fs("mkdir", ROOT, b"home", 0o755))
    fs("setattr", home, [None, 1000, 1000, None, None, None])
    f = ino(fs("create", home, b"secret", 0o600, False, who=ALICE))
    fs("write", f, 0, b"mine", who=ALICE)
    assert fs.err("read", f, 0, 10, who=BOB) == errno.EACCES
    assert fs.err("create", home, b"intruder", 0o644, False, who=BOB) == errno.EACCES
    assert fs.err("setattr", f, [0o644, None, None, None, None, None], who=BOB) == errno.EPERM
    assert fs.err("setattr", f, [None, 1001, None, None, None, None], who=ALICE) == errno.EPERM
    fs("setattr", f, [0o644, None, None, None, None, None], who=ALICE)
    assert fs("read", f, 0, 10, who=BOB) == [b"mine", True]
    tmp = ino(fs("mkdir", ROOT, b"tmp", 0o1777))  # sticky: only owners remove
    fs("create", tmp, b"alice", 0o644, False, who=ALICE)
    assert fs.err("remove", tmp, b"alice", [], who=BOB) == errno.EPERM
    fs("remove", tmp, b"alice", [], who=ALICE)


def test_readdir_pages_through_a_large_directory_with_stable_cookies() -> None:
    fs = Fs()
    d = ino(fs("mkdir", ROOT, b"big", 0o755))
    for i in range(10_000):
        fs("create", d, b"f%05d" % i, 0o644, False)
    names, cookie, eof = [], 0, False
    while not eof:
        entries, eof = fs("readdir", d, cookie, 1000)
        names += [n for n, _, _ in entries]
        cookie = entries[-1][2] if entries else cookie
        if cookie == 3000:
            fs("remove", d, b"f00000", [])  # changes behind the cursor do not disturb it
    assert len(names) == 10_000 and len(set(names)) == 10_000


def test_limits_and_malformed_operations() -> None:
    fs = Fs(Limits(bytes_max=3 * BLOCK, inodes_max=4, file_bytes_max=1 << 20))
    f = ino(fs("create", ROOT, b"f", 0o644, False))
    assert fs.err("write", f, 0, bytes(4 * BLOCK)) == errno.ENOSPC
    assert fs.err("write", f, 1 << 20, b"x") == errno.EFBIG
    fs("create", ROOT, b"g", 0o644, False)
    fs("create", ROOT, b"h", 0o644, False)
    assert fs.err("create", ROOT, b"i", 0o644, False) == errno.ENOSPC
    for bad in (b"", b"\xc1", msgpack.packb(["nope", ROOT_CREDS]), msgpack.packb(["read", ROOT_CREDS, "x"])):
        assert msgpack.unpackb(fs.fs.execute(bad, 0, 1))[0] == errno.EINVAL


def test_times_come_from_the_agreed_clock() -> None:
    fs = Fs()
    f = fs("create", ROOT, b"t", 0o644, False)
    assert f[7] == f[8] == f[9] == fs.time * 1_000_000
    assert fs.fs.is_read_only(msgpack.packb(["read", ROOT_CREDS, ino(f), 0, 1]))
    assert not fs.fs.is_read_only(msgpack.packb(["write", ROOT_CREDS, ino(f), 0, b"x"]))


def test_snapshots_cost_what_changed() -> None:
    fs = Fs()
    for i in range(50):
        f = ino(fs("create", ROOT, b"f%d" % i, 0o644, False))
        fs("write", f, 0, bytes([i]) * 40_000)
    table = ClientTable(4)
    first = capture(fs.fs, table, 0, None)
    fs("write", f, 0, b"changed")
    second = capture(fs.fs, table, 0, first)
    changed = sum(a is not b for a, b in zip(first.parts, second.parts, strict=True))
    assert 1 <= changed <= 4  # the counters, the inode, one block, the table


def test_a_restored_snapshot_looks_the_same_to_clients_and_behaves_the_same() -> None:
    fs = populated()
    before = observe(fs.fs)
    assert {b"/d/sub/f0", b"/moved", b"/sparse", b"/d/hard", b"/ln", b"/fifo", b"/d/alice"} <= before.keys()
    assert b"/d/f3" not in before and b"/d/f1" not in before
    snapshot = capture(fs.fs, ClientTable(4), 0, None)
    later = ino(fs("create", ROOT, b"later", 0o644, False))
    fs("write", later, 0, b"after the snapshot")
    fs("write", ino(fs("lookup", ROOT, b"moved")), 0, b"overwritten")
    fs("remove", ROOT, b"fifo", [])
    # A fresh replica rebuilt from the older snapshot (the state-transfer path) sees the state as
    # it was then, not as it is now; one restored from the current partitions sees it as now.
    old, _, _ = rebuild(FileSystem, 4, snapshot.parts)
    assert observe(old) == before
    now = FileSystem()
    now.restore(fs.fs.partitions())
    assert observe(now) == observe(fs.fs) != before
    # The counters came back too: the next inode number, generation and space used agree.
    g = Fs()
    g.fs, g.time = now, fs.time
    for h in (fs, g):
        made = h("create", ROOT, b"next", 0o644, False)
        h("write", ino(made), 0, bytes(3 * BLOCK))
    assert observe(g.fs) == observe(fs.fs)
    with pytest.raises(ValueError):
        FileSystem().restore([b"x"])


def test_limits_come_from_the_cluster_config(tmp_path) -> None:
    from bft import config as cfg
    from bft.service import make_service

    path = cfg.keygen(tmp_path, 1, 1, base_port=12000)
    text = path.read_text().replace("name_max = 255", "name_max = 8")
    path.write_text(text)
    cluster = cfg.load(path)
    fs = Fs()
    fs.fs = make_service("bfs", cluster.services["bfs"])
    assert fs.err("create", ROOT, b"123456789", 0o644, False) == errno.ENAMETOOLONG
    fs("create", ROOT, b"12345678", 0o644, False)
    with pytest.raises(ValueError, match="name_max"):
        make_service("bfs", {"name_max": 0})
    with pytest.raises(ValueError, match="unknown"):
        make_service("bfs", {"color": 3})


def test_hostile_operations_get_an_errno_and_change_nothing() -> None:
    """Found in review: these raised out of execute (which would stop a replica) or left a
    partial change that checkpoints did not record."""
    fs = Fs(Limits(bytes_max=3 * BLOCK))
    f = ino(fs("create", ROOT, b"f", 0o644, False))
    for op in (["getattr", [-1, 0, []], ROOT], ["getattr", [0, 0, ["x"]], ROOT],
               ["setattr", ROOT_CREDS, f, [None, None, None, None, 1e300, None]],
               ["setattr", ROOT_CREDS, f, [None, None, None, 5, None, "x"]]):
        assert msgpack.unpackb(fs.fs.execute(msgpack.packb(op), 0, 5))[0] == errno.EINVAL
    assert not fs.fs.is_read_only(msgpack.packb([[1], ROOT_CREDS]))
    assert fs("getattr", f)[6] == 0  # the refused truncate to 5 did not happen
    assert fs.err("write", f, 0, bytes(4 * BLOCK)) == errno.ENOSPC
    assert fs.fs.bytes_used == 0 and not fs.fs.blocks  # nothing half-written
    fs("setattr", f, [None, None, None, 10, None, None])
    assert fs("read", f, 0, 10) == [bytes(10), True]
    assert fs.err("setattr", f, [0o600, 5, None, None, None, None], who=ALICE) == errno.EPERM
    assert fs("getattr", f)[2] == 0o644  # a refused setattr changes nothing
    copy = FileSystem(fs.fs.limits)  # the limits are configuration, not state
    copy.restore(fs.fs.partitions())
    assert observe(copy) == observe(fs.fs)  # what the refusals left is what a checkpoint holds


def test_owner_writes_a_file_it_created_read_only() -> None:
    fs = Fs()
    home = ino(fs("mkdir", ROOT, b"home", 0o777))
    f = ino(fs("create", home, b"obj", 0o444, True, who=ALICE))  # git's loose objects
    fs("write", f, 0, b"data", who=ALICE)
    fs("setattr", f, [None, None, None, 2, None, None, True], who=ALICE)  # ftruncate on that handle
    # truncate(path) and O_TRUNC are checked against the mode, for the owner too
    assert fs.err("setattr", f, [None, None, None, 0, None, None], who=ALICE) == errno.EACCES
    assert fs("getattr", f)[6] == 2
    assert fs.err("write", f, 0, b"x", who=BOB) == errno.EACCES
    assert fs("write", f, 100, b"", who=ALICE)[6] == 2  # an empty write does not extend
    link = ino(fs("symlink", ROOT, b"ln", b"target"))
    assert fs.err("read", link, 0, 10) == errno.EINVAL


def test_create_open_opens_a_file_already_there_as_open_would() -> None:
    """The mount's create is an open(O_CREAT) of a name its kernel found missing; made since by
    another mount, the file is opened with the open's own access check and O_TRUNC applies (a
    reviewer's finding: the old tail survived, and a read-only open needed write permission)."""
    fs = Fs()
    home = ino(fs("mkdir", ROOT, b"home", 0o777))
    f = ino(fs("create", home, b"f", 0o644, False, who=ALICE))
    fs("write", f, 0, b"another mount's long contents", who=ALICE)
    made = fs("create_open", home, b"f", 0o644, False, 4, False, who=BOB)  # O_RDONLY: 0644 lets him
    assert made[0] == f and made[12] is False and made[6] == 29
    assert fs.err("create_open", home, b"f", 0o644, False, 2, False, who=BOB) == errno.EACCES
    assert fs.err("create", home, b"f", 0o644, False, who=BOB) == errno.EACCES  # as before
    assert fs("getattr", f)[6] == 29  # refused: nothing truncated
    assert fs("create_open", home, b"f", 0o644, False, 2, True, who=ALICE)[6] == 0  # O_TRUNC
    assert fs("read", f, 0, 100) == [b"", True]
    fs("setattr", f, [0o477, None, None, None, None, None], who=ALICE)
    fs("write", f, 0, b"kept", who=ALICE)
    # O_RDONLY|O_TRUNC of the owner's 0477 file: truncation is checked against the mode
    assert fs.err("create_open", home, b"f", 0o644, False, 4, True, who=ALICE) == errno.EACCES
    assert fs("getattr", f)[6] == 4
    fifo = ino(fs("mknod", home, b"fifo", "p", 0o666, 0, who=ALICE))
    assert fs("create_open", home, b"fifo", 0o644, False, 2, True, who=ALICE)[0] == fifo  # O_TRUNC ignored
    new = fs("create_open", home, b"g", 0o600, True, 6, True, who=BOB)
    assert new[12] is True and new[4] == 1001
    assert fs.err("create_open", home, b"g", 0o600, True, 6, True, who=BOB) == errno.EEXIST
    for mask, truncate in ((0, False), (1, False), (8, False), (2, 1), (2, None)):
        assert fs.err("create_open", home, b"h", 0o600, False, mask, truncate) == errno.EINVAL


def test_special_files_are_stored_with_their_type_mode_and_device_number() -> None:
    fs = Fs()
    dev = fs("mknod", ROOT, b"null", "c", 0o666, (1 << 8) | 3)
    assert (dev[1], dev[2], dev[11]) == ("c", 0o666, 259)
    assert fs("mknod", ROOT, b"disk", "b", 0o600, 7)[11] == 7
    sock = fs("mknod", ROOT, b"sock", "s", 0o755, 99)
    assert (sock[1], sock[11]) == ("s", 0)  # only devices have a device number
    home = ino(fs("mkdir", ROOT, b"home", 0o777))
    assert fs.err("mknod", home, b"d", "c", 0o600, 5, who=ALICE) == errno.EPERM  # devices: root only
    assert fs("mknod", home, b"fifo", "p", 0o600, 0, who=ALICE)[4] == 1000
    assert fs.err("mknod", home, b"x", "f", 0o600, 0) == errno.EINVAL
    assert fs.err("read", ino(dev), 0, 1) == errno.EINVAL
    copy = FileSystem()
    copy.restore(fs.fs.partitions())
    assert observe(copy) == observe(fs.fs)


def test_ownership_and_setuid_rules() -> None:
    fs = Fs()
    home = ino(fs("mkdir", ROOT, b"home", 0o777))
    f = ino(fs("create", home, b"prog", 0o6777, True, who=ALICE))
    # chown to the current owner and group by someone else is still refused
    assert fs.err("setattr", f, [None, 1000, None, None, None, None], who=BOB) == errno.EPERM
    assert fs.err("setattr", f, [None, None, 1000, None, None, None], who=BOB) == errno.EPERM
    fs("setattr", f, [None, 1000, 1000, None, None, None], who=ALICE)  # the owner may
    # a writer who is not the owner may only clear setuid/setgid (the kernel's kill before a write)
    assert fs.err("setattr", f, [0o775, None, None, None, None, None], who=BOB) == errno.EPERM
    assert fs("setattr", f, [0o777, None, None, None, None, None], who=BOB)[2] == 0o777
    assert fs.err("setattr", f, [0o777, None, None, None, None, None], who=BOB) == errno.EPERM
    fs("setattr", f, [0o6755, None, None, None, None, None], who=ALICE)
    assert fs.err("setattr", f, [0o755, None, None, None, None, None], who=BOB) == errno.EACCES
    # "now" is a writer's right, an explicit time the owner's
    fs("setattr", f, [0o777, None, None, None, None, None], who=ALICE)
    assert fs.err("setattr", f, [None, None, None, None, 5, 5], who=BOB) == errno.EPERM
    attrs = fs("setattr", f, [None, None, None, None, -1, -1], who=BOB)
    assert attrs[7] == attrs[8] == fs.time * 1_000_000


def test_a_file_kept_open_outlives_its_last_name_until_forgotten() -> None:
    fs = Fs()
    f = ino(fs("create", ROOT, b"f", 0o644, True))
    fs("write", f, 0, b"x" * 50_000)
    used = fs("fsstat")[1]
    assert fs("remove", ROOT, b"f", [f]) == f  # open in the calling mount: kept
    assert fs("getattr", f)[3] == 0 and fs("read", f, 0, 10)[0] == b"x" * 10
    assert fs("fsstat")[1] == used  # its space is still held
    g = ino(fs("create", ROOT, b"g", 0o644, True))
    h = ino(fs("create", ROOT, b"h", 0o644, True))
    assert fs("rename", ROOT, b"g", ROOT, b"h", [h]) == h  # renamed over while open
    assert fs("getattr", h)[3] == 0 and fs("lookup", ROOT, b"h")[0] == g
    copy = FileSystem()
    copy.restore(fs.fs.partitions())
    assert observe(copy) == observe(fs.fs) and copy.orphans == fs.fs.orphans == {f: 0, h: 0}
    # only the client that kept it can forget it
    fs.fs.execute(msgpack.packb(["forget", ROOT_CREDS, f]), 7, 5_000)
    assert fs("getattr", f)[3] == 0
    assert fs("forget", f) == 0
    assert fs.err("getattr", f) == errno.ESTALE and fs("fsstat")[1] > used
    assert fs("reclaim") == 1 and fs.err("getattr", h) == errno.ESTALE and not fs.fs.orphans
    assert fs("remove", ROOT, b"h", []) is None  # not open: gone at once
    assert fs.err("remove", ROOT, b"h", [1] * 5000) == errno.EINVAL


def test_readdir_resumes_at_a_cookie_without_sorting_the_directory() -> None:
    fs = Fs()
    d = ino(fs("mkdir", ROOT, b"d", 0o755))
    for i in range(3000):
        fs("create", d, b"f%05d" % i, 0o644, True)
    for i in range(0, 3000, 3):
        fs("remove", d, b"f%05d" % i, [])
    fs("rename", d, b"f00001", d, b"last", [])  # a rename moves the entry to the end
    seen, cookie, eof, pages = [], 0, False, 0
    while not eof:
        page, eof = fs("readdir", d, cookie, 100)
        seen += [name for name, _, _ in page]
        cookie, pages = page[-1][2], pages + 1
    expected = [b"f%05d" % i for i in range(2, 3000) if i % 3] + [b"last"]
    assert seen == expected and pages == 20
    directory = fs.fs.inodes[d]
    assert len(directory.order) <= 2 * len(directory.by_cookie) + 16  # removed cookies compacted
    copy = FileSystem()
    copy.restore(fs.fs.partitions())
    assert copy.inodes[d].entries_after(0, 5000) == directory.entries_after(0, 5000)


def test_extended_attributes_follow_linux_namespaces_and_limits() -> None:
    fs = Fs()
    home = ino(fs("mkdir", ROOT, b"home", 0o777))
    f = ino(fs("create", home, b"f", 0o644, True, who=ALICE))
    fs("setxattr", f, b"user.colour", b"blue", who=ALICE)
    fs("setxattr", f, b"trusted.secret", b"x")
    fs("setxattr", f, b"security.label", b"l")
    assert fs("getxattr", f, b"user.colour", who=BOB) == b"blue"  # readers may read
    assert fs.err("setxattr", f, b"user.colour", b"red", who=BOB) == errno.EACCES  # writers may write
    assert fs.err("setxattr", f, b"trusted.mine", b"x", who=ALICE) == errno.EPERM
    assert fs.err("getxattr", f, b"trusted.secret", who=ALICE) == errno.ENODATA
    assert fs.err("setxattr", f, b"security.label", b"m", who=ALICE) == errno.EPERM
    assert fs("getxattr", f, b"security.label", who=BOB) == b"l"
    assert fs("listxattr", f, who=ALICE) == [b"security.label", b"user.colour"]  # trusted.* is root's
    assert fs("listxattr", f) == [b"security.label", b"trusted.secret", b"user.colour"]
    assert fs.err("setxattr", f, b"system.posix_acl_access", b"", who=ALICE) == errno.EOPNOTSUPP
    assert fs.err("setxattr", f, b"user.", b"", who=ALICE) == errno.EOPNOTSUPP
    assert fs.err("getxattr", f, b"user.none", who=ALICE) == errno.ENODATA
    assert fs.err("setxattr", f, b"user." + b"n" * 251, b"", who=ALICE) == errno.ERANGE
    assert fs.err("setxattr", f, b"user.big", bytes(65537), who=ALICE) == errno.E2BIG
    fs("setxattr", f, b"user.big", bytes(65536), who=ALICE)
    assert fs.err("setxattr", f, b"user.more", bytes(5000), who=ALICE) == errno.ENOSPC
    link = ino(fs("symlink", home, b"ln", b"f", who=ALICE))
    assert fs.err("setxattr", link, b"user.x", b"", who=ALICE) == errno.EPERM  # user.*: files, dirs
    fs("setattr", home, [0o1777, None, None, None, None, None])
    assert fs.err("setxattr", home, b"user.x", b"", who=ALICE) == errno.EPERM  # sticky: owner's
    copy = FileSystem()
    copy.restore(fs.fs.partitions())
    assert copy.inodes[f].xattrs == fs.fs.inodes[f].xattrs
    fs("removexattr", f, b"user.colour", who=ALICE)
    assert fs.err("removexattr", f, b"user.colour", who=ALICE) == errno.ENODATA
