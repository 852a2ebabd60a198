/*
 * megafleet guest daemon: the agent and the exec channel of a guest in one
 * long-lived process that never forks in its steady state (fork+exec under
 * TCG costs a guest more than its idle kernel). Line formats are in
 * megafleet/imagegen/contract.py.
 *
 *   guestd NAME INTERVAL      vm mode: agent lines every INTERVAL seconds (0:
 *                             none) on the port org.megafleet.agent (else the
 *                             console), and the commands of the port
 *                             org.megafleet.exec. Exits if it has neither.
 *   agent NAME INTERVAL MODE  (called through a link named agent) agent
 *                             lines only; MODE container writes them to stdout.
 *   guestd --boot MODULES     vm init's first steps in one process (a fork
 *                             and exec cost a TCG guest ~20 ms each): mount
 *                             /proc, /sys, /dev, /dev/pts, /dev/shm, /run and
 *                             /tmp, then load the kernel modules the file
 *                             lists (paths under /lib/modules/RELEASE, in
 *                             load order) with finit_module.
 *
 * Agent: /proc and /sys are read directly, the addresses come from one netlink
 * dump; nothing is forked.
 *
 * Exec: a virtio-serial port reads end-of-file and polls POLLHUP while no host
 * program is connected to it, so polling it would spin. Instead the port is
 * opened with O_ASYNC: the virtio console driver sends SIGIO when the host
 * side connects or disconnects and when data arrives, and SIGIO (blocked, read
 * from a signalfd) wakes the one poll() the daemon sleeps in. Each command is
 * run by /bin/sh as `exec WORDS` (WORDS: the shell-quoted argv the host sent),
 * exactly as the former shell script did, from /, stdin /dev/null, its stdout
 * and stderr read through pipes and answered base64-encoded on one line.
 *
 * Built static by imagegen (build.py) with the host's gcc.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_PORT "org.megafleet.agent"
#define EXEC_PORT "org.megafleet.exec"
#define MAX_REQUEST (1 << 24) /* one request line, at most (16 MiB of base64) */

/* ---- growing buffer ---------------------------------------------------- */

struct buf {
    char *p;
    size_t len, cap;
};

static void buf_reserve(struct buf *b, size_t more)
{
    if (b->len + more + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        _exit(111); /* out of memory in a RAM guest: nothing sensible is left to do */
    b->p = p;
    b->cap = cap;
}

static void buf_add(struct buf *b, const char *s, size_t n)
{
    buf_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void buf_str(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

static void buf_fmt(struct buf *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0)
        buf_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static void buf_sep(struct buf *b, int *first)
{
    if (!*first)
        buf_add(b, ",", 1);
    *first = 0;
}

/* ---- small file helpers ------------------------------------------------ */

static ssize_t read_file(const char *path, char *out, size_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t got = 0;
    while (got + 1 < size) {
        ssize_t n = read(fd, out + got, size - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    out[got] = 0;
    return (ssize_t)got;
}

/* Write everything; on a non-blocking fd, `wait` says whether to wait for room
 * (an exec answer) or to give up (an agent line nobody reads). */
static int write_all(int fd, const char *p, size_t n, int wait)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN && wait) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            if (poll(&pfd, 1, 30000) <= 0 || (pfd.revents & (POLLHUP | POLLERR)))
                return -1;
            continue;
        }
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* The /dev node of the virtio-serial port with that name, or "" if none. */
static void find_port(const char *name, char *dev, size_t size)
{
    dev[0] = 0;
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return;
    struct dirent *e;
    char path[300], got[128];
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        if (read_file(path, got, sizeof got) <= 0)
            continue;
        got[strcspn(got, "\n")] = 0;
        if (strcmp(got, name) == 0) {
            snprintf(dev, size, "/dev/%s", e->d_name);
            break;
        }
    }
    closedir(d);
}

/* ---- the agent line ---------------------------------------------------- */

/* What one line costs matters: under TCG each syscall and each /proc lookup is
 * translated guest kernel code, and a guest writes a line every few seconds for
 * its whole life. So the /proc files stay open (pread at offset 0 regenerates
 * them), and the addresses and MTUs, which change only when the network is
 * reconfigured, are re-read only after the kernel announced such a change on a
 * netlink socket subscribed to link and address events. */
struct agent {
    const char *name;
    unsigned long seq;
    int uptime_fd, loadavg_fd, meminfo_fd, netdev_fd;
    int events_fd;      /* RTMGRP_LINK | RTMGRP_IPV*_IFADDR notifications, or -1 */
    int stale;          /* addresses and MTUs must be read again */
    struct buf addrs, mtus;
};

static ssize_t pread_text(int fd, char *out, size_t size)
{
    size_t got = 0;
    if (fd < 0) {
        out[0] = 0;
        return -1;
    }
    while (got + 1 < size) {
        ssize_t n = pread(fd, out + got, size - 1 - got, (off_t)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    out[got] = 0;
    return (ssize_t)got;
}

static long meminfo_kb(const char *text, const char *key)
{
    size_t klen = strlen(key);
    for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
        if (strncmp(p, key, klen) == 0 && p[klen] == ':')
            return strtol(p + klen + 1, NULL, 10);
    return 0;
}

/* name:rx_bytes:rx_packets:tx_bytes:tx_packets per line of /proc/net/dev. */
static void add_interfaces(struct buf *b, int fd)
{
    static char text[1 << 16];
    if (pread_text(fd, text, sizeof text) < 0)
        return;
    int first = 1, lineno = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (++lineno <= 2)
            continue; /* two header lines */
        char *colon = strchr(line, ':');
        if (!colon)
            continue;
        *colon = 0;
        while (*line == ' ')
            line++;
        unsigned long long v[16] = {0};
        char *p = colon + 1;
        for (int i = 0; i < 16; i++)
            v[i] = strtoull(p, &p, 10);
        buf_sep(b, &first);
        buf_fmt(b, "%s:%llu:%llu:%llu:%llu", line, v[0], v[1], v[8], v[9]);
    }
}

/* name:cidr of every address, from one RTM_GETADDR dump (IPv4 then IPv6, as
 * `ip -o addr` lists them per interface). */
static void read_addresses(struct buf *b)
{
    b->len = 0;
    buf_add(b, "", 0);
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0)
        return;
    struct {
        struct nlmsghdr nh;
        struct ifaddrmsg ifa;
    } req = {
        .nh = {.nlmsg_len = sizeof req, .nlmsg_type = RTM_GETADDR,
               .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP, .nlmsg_seq = 1},
        .ifa = {.ifa_family = AF_UNSPEC},
    };
    if (send(fd, &req, sizeof req, 0) < 0) {
        close(fd);
        return;
    }
    static char msg[1 << 16];
    int first = 1, done = 0;
    while (!done) {
        ssize_t n = recv(fd, msg, sizeof msg, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        for (struct nlmsghdr *nh = (struct nlmsghdr *)msg; NLMSG_OK(nh, (size_t)n);
             nh = NLMSG_NEXT(nh, n)) {
            if (nh->nlmsg_type == NLMSG_DONE || nh->nlmsg_type == NLMSG_ERROR) {
                done = 1;
                break;
            }
            if (nh->nlmsg_type != RTM_NEWADDR)
                continue;
            struct ifaddrmsg *ifa = NLMSG_DATA(nh);
            int len = (int)IFA_PAYLOAD(nh);
            void *addr = NULL, *local = NULL;
            for (struct rtattr *rta = IFA_RTA(ifa); RTA_OK(rta, len); rta = RTA_NEXT(rta, len)) {
                if (rta->rta_type == IFA_ADDRESS)
                    addr = RTA_DATA(rta);
                else if (rta->rta_type == IFA_LOCAL)
                    local = RTA_DATA(rta);
            }
            /* IFA_LOCAL is the address itself (IFA_ADDRESS is the peer on
             * point-to-point links), as `ip` prints it. */
            void *own = local ? local : addr;
            char name[IF_NAMESIZE], text[INET6_ADDRSTRLEN];
            if (!own || !if_indextoname(ifa->ifa_index, name) ||
                !inet_ntop(ifa->ifa_family, own, text, sizeof text))
                continue;
            buf_sep(b, &first);
            buf_fmt(b, "%s:%s/%u", name, text, ifa->ifa_prefixlen);
        }
    }
    close(fd);
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* name:mtu of every interface in /sys/class/net, sorted by name (a shell glob's order). */
static void read_mtus(struct buf *b)
{
    b->len = 0;
    buf_add(b, "", 0);
    DIR *d = opendir("/sys/class/net");
    if (!d)
        return;
    char *names[1024];
    int count = 0;
    struct dirent *e;
    while ((e = readdir(d)) && count < 1024)
        if (e->d_name[0] != '.')
            names[count++] = strdup(e->d_name);
    closedir(d);
    qsort(names, (size_t)count, sizeof names[0], cmp_names);
    int first = 1;
    for (int i = 0; i < count; i++) {
        char path[300], mtu[32];
        snprintf(path, sizeof path, "/sys/class/net/%s/mtu", names[i]);
        if (read_file(path, mtu, sizeof mtu) < 0)
            mtu[0] = 0;
        mtu[strcspn(mtu, "\n")] = 0;
        buf_sep(b, &first);
        buf_fmt(b, "%s:%s", names[i], mtu);
        free(names[i]);
    }
}

static void agent_open(struct agent *a, const char *name)
{
    memset(a, 0, sizeof *a);
    a->name = name;
    a->stale = 1;
    a->uptime_fd = open("/proc/uptime", O_RDONLY | O_CLOEXEC);
    a->loadavg_fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    a->meminfo_fd = open("/proc/meminfo", O_RDONLY | O_CLOEXEC);
    a->netdev_fd = open("/proc/net/dev", O_RDONLY | O_CLOEXEC);
    a->events_fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_ROUTE);
    struct sockaddr_nl sa = {.nl_family = AF_NETLINK,
                             .nl_groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR};
    if (a->events_fd >= 0 && bind(a->events_fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        close(a->events_fd);
        a->events_fd = -1;
    }
}

/* The events socket is readable: drop the news, remember to read again. */
static void agent_events(struct agent *a)
{
    static char msg[1 << 16];
    for (;;) {
        ssize_t n = recv(a->events_fd, msg, sizeof msg, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == ENOBUFS) { /* overflowed: still just "changed" */
            a->stale = 1;
            continue;
        }
        if (n <= 0)
            break;
        a->stale = 1;
    }
}

static void agent_line(struct agent *a, struct buf *b)
{
    char up[64] = "0", load[128] = "0 0 0", l1[32] = "0", l5[32] = "0", l15[32] = "0";
    static char mem[8192];
    if (a->stale || a->events_fd < 0) {
        a->stale = 0; /* before reading: a change meanwhile marks it again */
        read_addresses(&a->addrs);
        read_mtus(&a->mtus);
    }
    pread_text(a->uptime_fd, up, sizeof up);
    up[strcspn(up, " \n")] = 0;
    pread_text(a->loadavg_fd, load, sizeof load);
    sscanf(load, "%31s %31s %31s", l1, l5, l15);
    pread_text(a->meminfo_fd, mem, sizeof mem);
    b->len = 0;
    buf_fmt(b, "MEGAFLEET-AGENT v=1 name=%s seq=%lu up=%s load=%s,%s,%s mem=%ld,%ld,%ld if=",
            a->name, a->seq++, up, l1, l5, l15, meminfo_kb(mem, "MemTotal"),
            meminfo_kb(mem, "MemFree"), meminfo_kb(mem, "MemAvailable"));
    add_interfaces(b, a->netdev_fd);
    buf_str(b, " addr=");
    buf_add(b, a->addrs.p, a->addrs.len);
    buf_str(b, " mtu=");
    buf_add(b, a->mtus.p, a->mtus.len);
    buf_str(b, "\n");
}

/* ---- base64 ------------------------------------------------------------ */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static void b64_encode(struct buf *out, const unsigned char *p, size_t n)
{
    buf_reserve(out, (n + 2) / 3 * 4);
    char *o = out->p + out->len;
    size_t i = 0;
    for (; i + 2 < n; i += 3, o += 4) {
        unsigned v = p[i] << 16 | p[i + 1] << 8 | p[i + 2];
        o[0] = B64[v >> 18]; o[1] = B64[v >> 12 & 63]; o[2] = B64[v >> 6 & 63]; o[3] = B64[v & 63];
    }
    if (i < n) {
        unsigned v = p[i] << 16 | (i + 1 < n ? p[i + 1] << 8 : 0);
        o[0] = B64[v >> 18]; o[1] = B64[v >> 12 & 63];
        o[2] = i + 1 < n ? B64[v >> 6 & 63] : '=';
        o[3] = '=';
        o += 4;
    }
    out->len = (size_t)(o - out->p);
    out->p[out->len] = 0;
}

/* Decode in place; -1 on a character that is not base64. */
static ssize_t b64_decode(char *s)
{
    size_t o = 0;
    unsigned v = 0;
    int bits = 0;
    for (char *p = s; *p && *p != '='; p++) {
        const char *at = strchr(B64, *p);
        if (!at || !*p)
            return -1;
        v = v << 6 | (unsigned)(at - B64);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            s[o++] = (char)(v >> bits & 0xff);
        }
    }
    s[o] = 0;
    return (ssize_t)o;
}

/* ---- exec -------------------------------------------------------------- */

static sigset_t blocked; /* SIGIO and SIGCHLD: delivered through the signalfd only */

/* Run `exec WORDS` in /bin/sh; fill out/err and return the exit status as the
 * shell reports it (128+N for a signal). */
static int run_command(const char *words, struct buf *out, struct buf *err)
{
    int po[2], pe[2];
    if (pipe2(po, O_CLOEXEC) < 0)
        return 127;
    if (pipe2(pe, O_CLOEXEC) < 0) {
        close(po[0]); close(po[1]);
        return 127;
    }
    struct buf cmd = {0};
    buf_str(&cmd, "exec ");
    buf_str(&cmd, words);
    pid_t pid = fork();
    if (pid == 0) {
        sigprocmask(SIG_UNBLOCK, &blocked, NULL);
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0) { dup2(null, 0); close(null); }
        dup2(po[1], 1);
        dup2(pe[1], 2);
        if (chdir("/") < 0)
            _exit(127);
        execl("/bin/sh", "sh", "-c", cmd.p, (char *)NULL);
        _exit(127);
    }
    free(cmd.p);
    close(po[1]);
    close(pe[1]);
    if (pid < 0) {
        close(po[0]); close(pe[0]);
        return 127;
    }
    struct pollfd fds[2] = {{.fd = po[0], .events = POLLIN}, {.fd = pe[0], .events = POLLIN}};
    struct buf *bufs[2] = {out, err};
    int open_fds = 2;
    char chunk[65536];
    while (open_fds) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        for (int i = 0; i < 2; i++) {
            if (fds[i].fd < 0 || !fds[i].revents)
                continue;
            ssize_t n = read(fds[i].fd, chunk, sizeof chunk);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                close(fds[i].fd);
                fds[i].fd = -1;
                open_fds--;
            } else {
                buf_add(bufs[i], chunk, (size_t)n);
            }
        }
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 127;
}

/* One request line "ID WORDS64": run it and write the answer to fd. */
static void serve_request(int fd, char *line)
{
    char *space = strchr(line, ' ');
    if (!space)
        return;
    *space = 0;
    char *id = line, *words = space + 1;
    if (!*id || strspn(id, "0123456789abcdef") != strlen(id))
        return;
    words[strcspn(words, "\r")] = 0;
    if (b64_decode(words) < 0)
        words[0] = 0;
    struct buf out = {0}, err = {0}, answer = {0};
    buf_add(&out, "", 0);
    buf_add(&err, "", 0);
    int rc = run_command(words, &out, &err);
    buf_fmt(&answer, "MEGAFLEET-EXEC id=%s rc=%d out=", id, rc);
    b64_encode(&answer, (unsigned char *)out.p, out.len);
    buf_str(&answer, " err=");
    b64_encode(&answer, (unsigned char *)err.p, err.len);
    buf_str(&answer, "\n");
    write_all(fd, answer.p, answer.len, 1);
    free(out.p);
    free(err.p);
    free(answer.p);
}

/* ---- boot ------------------------------------------------------------- */

static int boot(const char *modules_file)
{
    static const struct { const char *type, *target, *options; mode_t mode; } mounts[] = {
        {"proc", "/proc", NULL, 0555},      {"sysfs", "/sys", NULL, 0555},
        {"devtmpfs", "/dev", NULL, 0755},   {"devpts", "/dev/pts", NULL, 0755},
        {"tmpfs", "/dev/shm", NULL, 01777}, {"tmpfs", "/run", "mode=0755", 0755},
        {"tmpfs", "/tmp", "mode=1777", 01777},
    };
    for (size_t i = 0; i < sizeof mounts / sizeof mounts[0]; i++) {
        mkdir(mounts[i].target, mounts[i].mode);
        /* EBUSY: mounted already (the shell mounts /proc first) */
        if (mount(mounts[i].type, mounts[i].target, mounts[i].type, 0, mounts[i].options) < 0 &&
            errno != EBUSY)
            fprintf(stderr, "guestd: mount %s: %s\n", mounts[i].target, strerror(errno));
    }
    struct utsname u;
    FILE *list = modules_file ? fopen(modules_file, "re") : NULL;
    if (!list || uname(&u) < 0)
        return 0;
    char rel[512], path[1024];
    while (fgets(rel, sizeof rel, list)) {
        rel[strcspn(rel, "\r\n")] = 0;
        if (!rel[0])
            continue;
        snprintf(path, sizeof path, "/lib/modules/%s/%s", u.release, rel);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST))
            fprintf(stderr, "guestd: module %s: %s\n", rel, strerror(errno));
        if (fd >= 0)
            close(fd);
    }
    fclose(list);
    return 0;
}

/* ---- main loop --------------------------------------------------------- */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    const char *self = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
    int agent_only = strcmp(self, "agent") == 0;
    if (argc > 1 && strcmp(argv[1], "--boot") == 0)
        return boot(argc > 2 ? argv[2] : NULL);
    const char *name = argc > 1 ? argv[1] : "guest";
    double interval = argc > 2 ? strtod(argv[2], NULL) : 5.0;
    const char *mode = agent_only && argc > 3 ? argv[3] : "vm";

    /* Where agent lines go: the agent port, else the console (vm) or stdout. */
    char dev[300];
    int agent_fd = -1;
    if (interval > 0) {
        find_port(AGENT_PORT, dev, sizeof dev);
        if (dev[0])
            agent_fd = open(dev, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        if (agent_fd < 0 && strcmp(mode, "vm") == 0)
            agent_fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
        if (agent_fd < 0)
            agent_fd = 1;
    }

    /* The exec port: one descriptor both ways (a port opens once at a time). */
    int exec_fd = -1;
    if (!agent_only) {
        find_port(EXEC_PORT, dev, sizeof dev);
        if (dev[0])
            exec_fd = open(dev, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    }
    if (interval <= 0 && exec_fd < 0)
        return 0; /* nothing to do: no process left behind in the guest */

    sigemptyset(&blocked);
    sigaddset(&blocked, SIGIO);
    sigprocmask(SIG_BLOCK, &blocked, NULL);
    signal(SIGPIPE, SIG_IGN);
    int sig_fd = signalfd(-1, &blocked, SFD_CLOEXEC | SFD_NONBLOCK);
    if (exec_fd >= 0) {
        /* SIGIO to us on host connect/disconnect and on incoming data. */
        fcntl(exec_fd, F_SETOWN, getpid());
        fcntl(exec_fd, F_SETFL, fcntl(exec_fd, F_GETFL) | O_ASYNC);
    }

    struct agent agent;
    if (interval > 0) {
        agent_open(&agent, name);
        /* Let the kernel fire our timer together with its own wakeups (up to
         * a tenth of the interval, at most 0.5 s late): an idle guest then
         * wakes up no more often for the agent than it does anyway. */
        double slack = interval / 10 < 0.5 ? interval / 10 : 0.5;
        prctl(PR_SET_TIMERSLACK, (unsigned long)(slack * 1e9), 0, 0, 0);
    }
    struct buf line = {0}, request = {0};
    double next = now();
    int host_connected = 1; /* until the port says otherwise */
    for (;;) {
        if (interval > 0 && now() >= next) {
            agent_line(&agent, &line);
            /* A line that cannot go out now (no reader) is dropped, never waited for. */
            write_all(agent_fd, line.p, line.len, 0);
            next += interval;
            if (next < now())
                next = now() + interval;
        }
        struct pollfd fds[3];
        int nfds = 0, sig_at = -1, exec_at = -1, events_at = -1;
        if (sig_fd >= 0) {
            sig_at = nfds;
            fds[nfds++] = (struct pollfd){.fd = sig_fd, .events = POLLIN};
        }
        if (exec_fd >= 0 && (host_connected || sig_fd < 0)) {
            exec_at = nfds;
            fds[nfds++] = (struct pollfd){.fd = exec_fd, .events = POLLIN};
        }
        if (interval > 0 && agent.events_fd >= 0 && !agent.stale) {
            events_at = nfds;
            fds[nfds++] = (struct pollfd){.fd = agent.events_fd, .events = POLLIN};
        }
        int timeout = -1;
        if (interval > 0) {
            double wait = next - now();
            timeout = wait <= 0 ? 0 : (int)(wait * 1000) + 1;
        }
        if (exec_fd >= 0 && sig_fd < 0 && !host_connected && (timeout < 0 || timeout > 1000))
            timeout = 1000; /* no signalfd: fall back to looking once a second */
        int n = poll(fds, (nfds_t)nfds, timeout);
        if (n < 0 && errno != EINTR)
            return 1;
        if (n <= 0)
            continue;
        if (events_at >= 0 && fds[events_at].revents)
            agent_events(&agent);
        if (sig_at >= 0 && fds[sig_at].revents) {
            struct signalfd_siginfo si;
            while (read(sig_fd, &si, sizeof si) > 0)
                ;
            host_connected = 1; /* something changed: look at the port again */
            continue;
        }
        if (exec_at < 0 || !fds[exec_at].revents)
            continue;
        char chunk[65536];
        ssize_t got = read(exec_fd, chunk, sizeof chunk);
        if (got < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (got <= 0) {
            /* End of file: no host program connected. Sleep until SIGIO. */
            host_connected = 0;
            request.len = 0;
            continue;
        }
        buf_add(&request, chunk, (size_t)got);
        char *nl;
        while (request.len && (nl = memchr(request.p, '\n', request.len))) {
            *nl = 0;
            size_t used = (size_t)(nl - request.p) + 1;
            char *one = strdup(request.p);
            memmove(request.p, request.p + used, request.len - used);
            request.len -= used;
            request.p[request.len] = 0;
            if (one) {
                serve_request(exec_fd, one);
                free(one);
            }
        }
        if (request.len > MAX_REQUEST)
            request.len = 0;
    }
}
