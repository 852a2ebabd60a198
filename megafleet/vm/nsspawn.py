"""Container launcher: a small single-threaded helper process that starts
container guests on request.

Run as ``python -I -S nsspawn.py`` (no megafleet import, so it starts in a few
milliseconds); it reads one JSON request per line on stdin and answers one JSON
line per request on stdout: ``{"id": ..., "pid": N}`` or ``{"id": ..., "error": "..."}``.
Requests are served concurrently: answers come as launches finish, in any order.

Why a helper: a container needs work done *between* creating its namespaces and
running its init (mount the overlay, pivot into it, receive its NICs). That needs
fork() without exec, which is unsafe in the multi-threaded engine but fine here.
A helper forks in ~1 ms, so a thousand containers start in seconds.

For each request, with ``gdir`` the guest's directory (already recorded):

1. ``gdir/upper`` (the writable layer) gets ``etc/megafleet/cmdline``;
   ``gdir/work`` and ``gdir/root`` are created.
2. fork (the "launcher"), which unshares a new PID namespace and forks the
   guest's init (PID 1 there). The launcher writes the init's host pid to
   ``gdir/pid`` at once.
3. The init-to-be unshares mount, UTS, IPC and network namespaces and waits
   while the launcher moves its NICs (veth ends) into that network namespace
   (renamed ethN, with the guest's MAC), moves the init into the cgroups the
   request names (``cgroup_procs``, when the launcher is not already in the
   testbed's guests cgroup, where `up` starts it) and, when the request carries ``net``,
   enters that namespace and configures it: lo and NICs up, MTUs, addresses,
   routes, gateways, forwarding (`cnet`: rtnetlink messages, no process).
4. It mounts the overlay (image rootfs as read-only lower dir, ``upper`` and
   ``work``) on ``root``, a read-only sysfs of its own network namespace, a
   tmpfs /dev with nodes of the harmless host devices, /proc of its own PID
   namespace and tmpfs /run and /tmp, moves it onto / and chroots into it
   (see `guest_init` for why not pivot_root); then it execs the
   image's init with MEGAFLEET_CONTAINER=1, stdout and stderr to
   ``gdir/console.log``. With ``net`` in the request it also sets
   MEGAFLEET_PREPARED=1: mounts, hostname and network are done and the host
   samples the guest's telemetry, so the init forks nothing before its ready
   line and starts no agent.

All the container's mounts live only in its own mount namespace: when its init
dies, they vanish with it. Nothing of it needs unmounting on the host.
"""

import ctypes
import json
import os
import selectors
import stat
import sys

# Not on sys.path under -I: the network helper is the file beside this one.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cnet  # noqa: E402

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_MOVE, MS_REC, MS_PRIVATE = 8192, 16384, 1 << 18

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# name -> (mode, device number) of the host's nodes, read once per helper.
HOST_DEVICES = {dev: (st.st_mode, st.st_rdev) for dev in DEVICES
                for st in [os.stat("/dev/" + dev)] if stat.S_ISCHR(st.st_mode)}
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


def guest_init(req, console_fd, ready_w, go_r):
    """In the new PID namespace (we are PID 1): finish the container, exec init."""
    os.setsid()
    unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET)
    os.write(ready_w, b"u")
    if os.read(go_r, 1) != b"g":
        os._exit(1)
    gdir = req["gdir"]
    root = gdir + "/root"
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("overlay", root, "overlay", 0,
          f"lowerdir={req['lower']},upperdir={gdir}/upper,workdir={gdir}/work")
    # sysfs of the container's own network namespace (read-only): the init finds
    # its NICs by MAC under /sys/class/net.
    mount("sysfs", root + "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID, "mode=0755,size=64k")
    # The host's harmless character devices, as nodes of their own (a node is
    # one mknod; a bind mount per device took the mount lock six more times).
    old_umask = os.umask(0)             # the host's modes (0666), not masked
    for dev, (mode, rdev) in HOST_DEVICES.items():
        os.mknod(f"{root}/dev/{dev}", mode, rdev)
    os.umask(old_umask)
    env = GUEST_ENV
    if req.get("net") is not None:
        # What the init would otherwise fork mount, mkdir and grep for.
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount("tmpfs", root + "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
        mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        os.mkdir(root + "/run/megafleet")
        env = dict(GUEST_ENV, MEGAFLEET_PREPARED="1")
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
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(console_fd, 1)
    os.dup2(console_fd, 2)
    os.closerange(3, 65536)
    os.execve(req["init"], [req["init"]], env)


def launcher(req, console_fd, report_w):
    """Forked per container: new PID namespace, fork the init, hand it its NICs."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    unshare(CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(go_w)
            guest_init(req, console_fd, ready_w, go_r)
        except BaseException as exc:  # report on the guest's console, then die
            os.write(console_fd, f"megafleet nsspawn: {exc}\n".encode())
        os._exit(127)
    os.close(ready_w)
    os.close(go_r)
    with open(req["gdir"] + "/pid", "w") as f:
        f.write(f"{pid}\n")
    try:
        if os.read(ready_r, 1) != b"u":
            raise RuntimeError("container init died before its namespaces were ready")
        for procs in req.get("cgroup_procs", ()):
            # Before the init runs anything: what it forks stays in there too.
            try:
                with open(procs, "w") as f:
                    f.write(str(pid))
            except OSError as exc:
                raise RuntimeError(f"moving the container into its cgroup {procs}: {exc.strerror}") from None
        netns = f"/proc/{pid}/ns/net"
        if req.get("net") is not None:
            # The launcher ends up in the container's network namespace; it
            # exits right after.
            cnet.setup(cnet.NetConfig.from_json(req["net"]), netns)
        else:
            cnet.move_links(tuple(cnet.Nic(n["dev"], n["name"], n["mac"])
                                  for n in req.get("nics", ())), netns)
        os.write(go_w, b"g")
    except BaseException as exc:
        os.kill(pid, 9)
        os.write(report_w, json.dumps({"error": str(exc)}).encode())
        os._exit(1)
    os.write(report_w, json.dumps({"pid": pid}).encode())
    os._exit(0)


def spawn(req):
    """Start one container's launcher; returns (launcher pid, fd its report comes
    on). The report is read by `main` when it comes: launches overlap."""
    gdir = req["gdir"]
    for sub in ("upper/etc/megafleet", "work", "root"):
        os.makedirs(f"{gdir}/{sub}", exist_ok=True)
    with open(f"{gdir}/upper/etc/megafleet/cmdline", "w") as f:
        f.write(req["cmdline"] + "\n")
    console_fd = os.open(f"{gdir}/console.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    report_r, report_w = os.pipe()
    try:
        child = os.fork()
        if child == 0:
            # The forked launcher must never return into the helper's loop below
            # (it would serve the helper's requests and wait for its children):
            # it exits here whatever happens, also when its report cannot be
            # written because the helper is gone (its engine was interrupted).
            try:
                os.close(report_r)
                launcher(req, console_fd, report_w)
            except BaseException as exc:
                try:
                    os.write(report_w, json.dumps({"error": str(exc)}).encode())
                except OSError:
                    pass
            finally:
                os._exit(1)
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(report_w)
        os.close(console_fd)
    return child, report_r


_engine_gone = False


def _reply(req_id, reply):
    """Answer the engine; once it has stopped reading (it was interrupted:
    Ctrl-C or SIGTERM of `up`), answer no more but keep serving the launchers
    under way, so each reports (its container's pidfile tells the rest) and is
    reaped, and no traceback reaches the user's terminal."""
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


def main():
    """Serve requests until stdin closes, many at once: each launcher's network
    set-up waits on the kernel (the rtnl lock every namespace and link change
    takes), so the helper starts the next while earlier ones wait, and answers
    each request when its launcher reports (answers may come out of order; each
    carries its request's id)."""
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    pending: dict[int, tuple[object, int, list[bytes]]] = {}   # report fd -> (request id, launcher pid, chunks)
    buffer = b""
    open_input = True
    while open_input or pending:
        for key, _ in sel.select():
            if key.data is None:
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    open_input = False
                    continue
                buffer += data
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    if not line.strip():
                        continue
                    req = json.loads(line)
                    try:
                        child, fd = spawn(req)
                    except Exception as exc:
                        _reply(req.get("id"), {"error": f"{type(exc).__name__}: {exc}"})
                        continue
                    pending[fd] = (req.get("id"), child, [])
                    sel.register(fd, selectors.EVENT_READ, fd)
            else:
                fd = key.data
                data = os.read(fd, 4096)
                req_id, child, chunks = pending[fd]
                if data:
                    chunks.append(data)
                    continue
                sel.unregister(fd)
                os.close(fd)
                del pending[fd]
                os.waitpid(child, 0)
                raw = b"".join(chunks)
                _reply(req_id, json.loads(raw) if raw else {"error": "container launcher died"})


if __name__ == "__main__":
    main()
