"""Container launcher: a small single-threaded helper process that starts
container guests on request.

Run as ``python -I -S nsspawn.py`` (no megafleet import, so it starts in a few
milliseconds); it reads one JSON request per line on stdin and answers one JSON
line per request on stdout: ``{"id": ..., "pid": N}`` or ``{"id": ..., "error": "..."}``.

Why a helper: a container needs work done *between* creating its namespaces and
running its init (its network, its root), in namespaces the caller then
leaves again. That is unsafe in the multi-threaded engine (setns and unshare
act on the calling thread, chroot on the whole process) but fine here.

For each request, with ``gdir`` the guest's directory (already recorded), the
helper itself, one request after the other:

1. writes ``gdir/upper/etc/megafleet/cmdline`` (the writable layer) and creates
   ``gdir/work`` and ``gdir/root``;
2. unshares a new network namespace and builds the container's network
   (`cnet.setup`, rtnetlink messages, no process): its defaults from inside;
   back in the host's namespace, veth pairs with their host ends up on their
   bridges and their far ends born inside, the host ends' IPv6 off; inside
   again, lo and NICs up, MTUs, addresses, routes, gateways. Without ``net``
   in the request it moves the existing veth ends of ``nics`` in;
3. unshares new mount, UTS and IPC namespaces and builds the container's root
   in them (`build_root`): the overlay (image rootfs as read-only lower dir,
   ``upper`` and ``work``) on ``root``, a read-only sysfs of the container's
   network namespace, a tmpfs /dev with nodes of the harmless host devices,
   with ``net`` tmpfs /run and /tmp; moves it onto / and chroots into it; sets
   the hostname;
4. unshares a new PID namespace for its next child and spawns its PID 1 there
   (posix_spawn: no copy of this process): the image's busybox, which mounts
   /proc of that PID namespace and execs the image's init with
   MEGAFLEET_CONTAINER=1, stdout and stderr to ``gdir/console.log``; writes its
   host pid to ``gdir/pid``;
5. goes back to its own namespaces, root and working directory, and answers
   with the init's pid.

With ``net`` in the request the init also gets MEGAFLEET_PREPARED=1: mounts,
hostname and network are done and the host samples the guest's telemetry, so
the init forks nothing before its ready line and starts no agent. A failure of
the init's own steps goes to its console, and the engine sees it exit before
its ready line. The init is born in the helper's cgroup: `up` starts the
helpers in the testbed's guests cgroup (moving each init after its start cost
an RCU grace period per move).

Why the helper does all this itself, and not a launcher process per
container as before: a forked copy of this Python process costs page faults
for every page it touches and an exit that frees them (a quarter of all CPU of
an `up` of 5,000 containers, perf), and 5,000 launchers configuring at once
queue on the kernel's rtnl lock; one helper per CPU, each doing its
containers' work in turn, pays neither.

All the container's mounts live only in its own mount namespace: when its init
dies, they vanish with it. Nothing of it needs unmounting on the host. The
helper ignores SIGCHLD, so the kernel reaps the inits that die while it runs
(each init's is reset to the default at its spawn).
"""

import ctypes
import json
import os
import signal
import stat
import sys

# Not on sys.path under -I: the network helper is the file beside this one,
# and the rtnetlink encoding it imports (rtnl) is in the directory above,
# appended so that none of megafleet's modules hides one of the stdlib's.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _here)
sys.path.append(os.path.dirname(_here))
import cnet  # noqa: E402

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 4096, 8192, 16384, 1 << 18

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# name -> (mode, device number) of the host's nodes, read once per helper.
HOST_DEVICES = {dev: (st.st_mode, st.st_rdev) for dev in DEVICES
                for st in [os.stat("/dev/" + dev)] if stat.S_ISCHR(st.st_mode)}
BUSYBOX = "/bin/busybox"                # in the image: every megafleet image has it
GUEST_ENV = {"MEGAFLEET_CONTAINER": "1", "HOME": "/root", "TERM": "dumb",
             "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

libc = ctypes.CDLL(None, use_errno=True)


def _check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags):
    _check(libc.unshare(flags), "unshare")


def mount(source, target, fstype, flags=0, data=None):
    enc = lambda s: None if s is None else s.encode()
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def build_root(req):
    """In the container's fresh mount, UTS and IPC namespaces (the helper's own
    until `Namespaces.back`) and its network namespace: mount its root and make
    it the helper's root, set its hostname. What its init then inherits."""
    gdir = req["gdir"]
    root = gdir + "/root"
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("overlay", root, "overlay", 0,
          f"lowerdir={req['lower']},upperdir={gdir}/upper,workdir={gdir}/work")
    # sysfs of the container's own network namespace (read-only), where tools
    # inside look for its NICs.
    mount("sysfs", root + "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID, "mode=0755,size=64k")
    # The host's harmless character devices, as nodes of their own (a node is
    # one mknod; a bind mount per device took the mount lock six more times).
    old_umask = os.umask(0)             # the host's modes (0666), not masked
    for dev, (mode, rdev) in HOST_DEVICES.items():
        os.mknod(f"{root}/dev/{dev}", mode, rdev)
    os.umask(old_umask)
    # /proc comes with the init's start (see `spawn`): busybox's --mount-proc
    # makes its mount point private first, which needs it to be a mount.
    mount(root + "/proc", root + "/proc", None, MS_BIND)
    if req.get("net") is not None:
        # What the init would otherwise fork mount and mkdir for.
        mount("tmpfs", root + "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
        mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        os.mkdir(root + "/run/megafleet")
    # The new root moves onto / and becomes this process's root (what
    # switch_root does), rather than pivot_root: pivot_root visits every task
    # on the host (chroot_fs_refs) to re-point those rooted in the old root,
    # 6.9 % of the CPU of an `up` of 5,000 containers and more with every one
    # started. The old root stays under the new one in this mount namespace:
    # private copies (the host unmounts its own freely), out of reach from
    # inside ("/.." of an overmounted root leads back to the mount on top),
    # gone with the namespace.
    os.chdir(root)
    mount(root, "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    name = req["hostname"].encode()
    _check(libc.sethostname(name, len(name)), "sethostname")


class Namespaces:
    """The helper's own namespaces, to come back to after each container's
    (held open for the helper's lifetime), and its rtnetlink socket in the
    host's network namespace."""

    # The mount namespace first: it gives back our root and working directory.
    KINDS = (("mnt", CLONE_NEWNS), ("net", CLONE_NEWNET), ("uts", CLONE_NEWUTS),
             ("ipc", CLONE_NEWIPC), ("pid", CLONE_NEWPID))

    def __init__(self):
        self.fds = {kind: os.open(f"/proc/self/ns/{kind}", os.O_RDONLY) for kind, _ in self.KINDS}
        self.host_sock = cnet.route_socket()

    def back(self):
        """Ourselves in the host's mount (with our root and working directory),
        network, UTS and IPC namespaces; children born next in our own PID
        namespace."""
        for kind, flag in self.KINDS:
            _check(libc.setns(self.fds[kind], flag), f"setns back to the helper's {kind} namespace")


def spawn(req, home):
    """Start one container (steps 1-5 of the module docstring); its init's pid.
    Raises on any failure, with the helper back in its own namespaces and
    nothing of the container left running (its network and mount namespaces,
    and with them the far ends of its veth pairs and so the pairs, and its
    mounts, go with their last reference)."""
    gdir = req["gdir"]
    for sub in ("upper/etc/megafleet", "work", "root"):
        os.makedirs(f"{gdir}/{sub}", exist_ok=True)
    with open(f"{gdir}/upper/etc/megafleet/cmdline", "w") as f:
        f.write(req["cmdline"] + "\n")
    net = req.get("net")
    config = cnet.NetConfig.from_json(net) if net is not None else cnet.NetConfig(
        nics=tuple(cnet.Nic(n["dev"], n["name"], n["mac"]) for n in req.get("nics", ())))
    indexes = cnet.host_indexes(config.nics)        # in the host's namespace
    # Opened here: from step 3 on, paths resolve inside the container's root.
    console_fd = os.open(f"{gdir}/console.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    gdir_fd = os.open(gdir, os.O_RDONLY | os.O_DIRECTORY)
    env = dict(GUEST_ENV, MEGAFLEET_PREPARED="1") if net is not None else GUEST_ENV
    netns_fd = None
    try:
        unshare(CLONE_NEWNET)
        netns_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        if net is not None:
            cnet.setup(config, home.host_sock, home.fds["net"], netns_fd, indexes)
        else:
            cnet.move_in(config.nics, home.host_sock, netns_fd, indexes)
        unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC)
        build_root(req)
        unshare(CLONE_NEWPID)
        # PID 1 of the new PID namespace: the image's busybox mounts /proc of
        # that namespace (only a process inside it can: a /proc shows the PID
        # namespace of whoever mounts it) and execs the image's init. Spawned,
        # not forked: posix_spawn's child shares this process's memory until
        # its exec, where a forked copy of this Python process cost page-table
        # copies, copy-on-write faults and their unmapping at the exec (~8 % of
        # the CPU of an `up` of 5,000 containers, perf).
        argv = ["busybox", "unshare", "--mount-proc=/proc", "--", req["init"]]
        pid = os.posix_spawn(BUSYBOX, argv, env, setsid=True, setsigdef=(signal.SIGCHLD,),
                             file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                           (os.POSIX_SPAWN_DUP2, console_fd, 1),
                                           (os.POSIX_SPAWN_DUP2, console_fd, 2)])
        pid_fd = os.open("pid", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=gdir_fd)
        os.write(pid_fd, f"{pid}\n".encode())
        os.close(pid_fd)
        return pid
    finally:
        os.close(console_fd)
        os.close(gdir_fd)
        home.back()
        if netns_fd is not None:
            os.close(netns_fd)


_engine_gone = False


def _reply(req_id, reply):
    """Answer the engine; once it has stopped reading (it was interrupted:
    Ctrl-C or SIGTERM of `up`), answer no more but serve the requests it
    sent until its end closes our stdin (each container's pidfile tells its
    successor the rest), and no traceback reaches the user's terminal."""
    global _engine_gone
    if _engine_gone:
        return
    reply["id"] = req_id
    try:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _engine_gone = True
        # Python would flush stdout again at exit and print that it failed.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def join_cgroups(procs_files):
    """Move this process into the cgroups whose cgroup.procs files are given
    (the testbed's guests cgroups), before it spawns any init: each init is
    born there. A cgroup that is gone (or none is supported) is left out."""
    for path in procs_files:
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")          # "0": the writing process itself
            finally:
                os.close(fd)
        except OSError:
            pass


def main():
    """Serve requests until stdin closes, one after the other (one helper per
    CPU serves in parallel with the others): each answered when its
    container's init is on its way. The arguments: cgroup.procs files to join
    first."""
    join_cgroups(sys.argv[1:])
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)      # the kernel reaps dead inits
    home = Namespaces()
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            _reply(req.get("id"), {"pid": spawn(req, home)})
        except (OSError, RuntimeError) as exc:     # what the kernel refused, named
            _reply(req.get("id"), {"error": str(exc)})
        except Exception as exc:
            _reply(req.get("id"), {"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
    # Nothing to clean up (each container lives on in its own namespaces) and
    # every answer is flushed: skip the interpreter's teardown, which the
    # engine waits for when it closes the helpers (~30 ms of each `up`).
    os._exit(0)
