/*
 * loadgen: a small, single-threaded epoll load generator for netd's benchmark.
 *
 *   loadgen tcp-short -p PORT [-c CONC] [-n COUNT] [-t SECONDS] [-s SIZE] [-e]
 *       CONC connections in flight; each one connects, sends SIZE bytes, reads
 *       SIZE bytes back (with -e: half-closes and reads until EOF) and closes.
 *   loadgen udp -p PORT [-c WINDOW] [-n COUNT] [-t SECONDS] [-s SIZE] [-T MS]
 *       WINDOW sockets, each with one request in flight; a reply that does not
 *       come within MS milliseconds counts as lost and the next request is sent.
 *   loadgen bulk -p PORT [-m MB] [-t SECONDS]
 *       one connection streams MB megabytes through an echo service.
 *
 * Every run stops by itself: after COUNT operations or SECONDS, whichever is first
 * (connections still in flight at the deadline are dropped and not counted).
 * Prints one JSON line: operations started and done, rate, p50/p99 latency, errors, and
 * the CPU time loadgen used.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONC 4096
#define MAX_SIZE 65536
#define CONN_TIMEOUT_S 5.0

enum state { IDLE, CONNECTING, SENDING, READING };

struct slot {
    int fd;
    enum state st;
    double started;
    size_t sent, got;
    uint32_t seq;
};

static const char *mode;
static const char *host = "127.0.0.1";
static int port, conc = 16, size = 64, until_eof, udp_timeout_ms = 200;
static long count = 20000;
static double seconds = 5.0, megabytes = 64.0;
static struct sockaddr_in addr;
static char payload[MAX_SIZE], buf[MAX_SIZE];
static struct slot slots[MAX_CONC];
static double *lat;
static long nlat, started_n, done_n, errors, timeouts, short_reads;
static int ep;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(double p)
{
    if (nlat == 0)
        return 0.0;
    long i = (long)(p / 100.0 * (nlat - 1) + 0.5);
    return lat[i];
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void report(double elapsed, double cpu, double bytes)
{
    qsort(lat, nlat, sizeof *lat, cmp_double);
    double rate = elapsed > 0 ? done_n / elapsed : 0.0;
    printf("{\"mode\":\"%s\",\"port\":%d,\"conc\":%d,\"started\":%ld,\"done\":%ld,"
           "\"errors\":%ld,"
           "\"timeouts\":%ld,\"short_reads\":%ld,\"elapsed_s\":%.3f,\"rate\":%.1f,"
           "\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"mb_s\":%.1f,\"cpu_s\":%.3f}\n",
           mode, port, conc, started_n, done_n, errors, timeouts, short_reads, elapsed, rate,
           percentile(50) * 1e3, percentile(99) * 1e3,
           elapsed > 0 ? bytes / elapsed / 1e6 : 0.0, cpu);
}

/* ---- tcp-short ---------------------------------------------------------- */

static void slot_close(struct slot *s)
{
    if (s->fd >= 0)
        close(s->fd);   /* close also removes it from the epoll set */
    s->fd = -1;
    s->st = IDLE;
}

static void slot_open(struct slot *s)
{
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0)
        die("socket");
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    s->started = now();
    s->sent = s->got = 0;
    started_n++;
    if (connect(s->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        errors++;
        slot_close(s);
        return;
    }
    s->st = CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP,
                             .data.ptr = s};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev) < 0)
        die("epoll_ctl");
}

static void slot_finish(struct slot *s, int ok)
{
    if (ok) {
        done_n++;
        lat[nlat++] = now() - s->started;
    } else {
        errors++;
    }
    slot_close(s);
}

static void slot_event(struct slot *s, uint32_t events)
{
    if (s->st == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            slot_finish(s, 0);
            return;
        }
        s->st = SENDING;
    }
    if (s->st == SENDING) {
        ssize_t n = send(s->fd, payload + s->sent, size - s->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN)
                return;
            slot_finish(s, 0);
            return;
        }
        s->sent += n;
        if ((int)s->sent < size)
            return;
        if (until_eof)
            shutdown(s->fd, SHUT_WR);
        s->st = READING;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = s};
        epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
        if (!(events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP)))
            return;
    }
    for (;;) {
        ssize_t n = recv(s->fd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EAGAIN)
                return;
            slot_finish(s, 0);
            return;
        }
        if (n == 0) {   /* EOF */
            if ((int)s->got < size)
                short_reads++;
            slot_finish(s, (int)s->got >= size);
            return;
        }
        s->got += n;
        if (!until_eof && (int)s->got >= size) {
            slot_finish(s, 1);
            return;
        }
    }
}

static void run_tcp_short(void)
{
    struct epoll_event events[MAX_CONC];
    double t0 = now(), deadline = t0 + seconds, cpu0 = cpu_seconds();
    for (int i = 0; i < conc; i++)
        slots[i].fd = -1;
    for (;;) {
        double t = now();
        int stop = t >= deadline || (started_n >= count);
        int active = 0;
        for (int i = 0; i < conc; i++) {
            struct slot *s = &slots[i];
            if (s->st != IDLE && t - s->started > CONN_TIMEOUT_S) {
                timeouts++;
                slot_close(s);
            }
            if (s->st == IDLE && !stop && started_n < count)
                slot_open(s);
            if (s->st != IDLE)
                active++;
        }
        if (!active || t >= deadline)
            break;
        int n = epoll_wait(ep, events, MAX_CONC, 50);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++)
            slot_event(events[i].data.ptr, events[i].events);
    }
    for (int i = 0; i < conc; i++)
        slot_close(&slots[i]);
    double end = now() < deadline ? now() : deadline;
    report(end - t0, cpu_seconds() - cpu0, (double)done_n * size * 2);
}

/* ---- udp ------------------------------------------------------------------ */

static void udp_send(struct slot *s, uint32_t seq)
{
    s->seq = seq;
    memcpy(payload, &seq, sizeof seq);
    s->started = now();
    started_n++;
    if (send(s->fd, payload, size, 0) < 0)
        errors++;   /* the reply will not come: counted again as a timeout */
}

static void run_udp(void)
{
    struct epoll_event events[MAX_CONC];
    uint32_t seq = 1;
    double t0 = now(), deadline = t0 + seconds, cpu0 = cpu_seconds();
    if (size < (int)sizeof(uint32_t))
        size = sizeof(uint32_t);
    for (int i = 0; i < conc; i++) {
        struct slot *s = &slots[i];
        s->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (s->fd < 0)
            die("socket");
        if (connect(s->fd, (struct sockaddr *)&addr, sizeof addr) < 0)
            die("connect");
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
        epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
        s->st = READING;
        udp_send(s, seq++);
    }
    double end = t0;
    for (;;) {
        double t = now();
        if (t >= deadline)
            break;
        int n = epoll_wait(ep, events, MAX_CONC, 10);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        t = now();
        for (int i = 0; i < n; i++) {
            struct slot *s = events[i].data.ptr;
            for (;;) {
                ssize_t r = recv(s->fd, buf, sizeof buf, 0);
                if (r < 0)
                    break;   /* EAGAIN, or an ICMP error (port closed): the timeout handles it */
                uint32_t got;
                if (r < (ssize_t)sizeof got || s->st != READING)
                    continue;
                memcpy(&got, buf, sizeof got);
                if (got != s->seq)
                    continue;   /* a late reply to a request already counted lost */
                done_n++;
                lat[nlat++] = t - s->started;
                end = t;
                s->st = IDLE;
            }
        }
        int open = 0;
        for (int i = 0; i < conc; i++) {
            struct slot *s = &slots[i];
            if (s->st == READING && (t - s->started) * 1e3 > udp_timeout_ms) {
                timeouts++;
                s->st = IDLE;
            }
            if (s->st == IDLE && started_n < count && t < deadline) {
                s->st = READING;
                udp_send(s, seq++);
            }
            if (s->st == READING)
                open++;
        }
        if (!open)
            break;
    }
    for (int i = 0; i < conc; i++)
        close(slots[i].fd);
    if (end <= t0)
        end = now();
    report(end - t0, cpu_seconds() - cpu0, (double)done_n * size * 2);
}

/* ---- bulk ----------------------------------------------------------------- */

static void run_bulk(void)
{
    struct epoll_event events[4];
    long total = (long)(megabytes * 1e6), sent = 0, got = 0;
    double t0 = now(), deadline = t0 + seconds, cpu0 = cpu_seconds();
    conc = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    started_n = 1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        errors++;
        goto out;
    }
    fcntl(fd, F_SETFL, O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    while (got < total && now() < deadline) {
        int n = epoll_wait(ep, events, 4, 50);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            if ((events[i].events & EPOLLOUT) && sent < total) {
                long want = total - sent < MAX_SIZE ? total - sent : MAX_SIZE;
                ssize_t w = send(fd, payload, want, MSG_NOSIGNAL);
                if (w > 0)
                    sent += w;
                else if (w < 0 && errno != EAGAIN) {
                    errors++;
                    goto out;
                }
                if (sent >= total) {
                    struct epoll_event in = {.events = EPOLLIN, .data.fd = fd};
                    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &in);
                }
            }
            if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                ssize_t r;
                while ((r = recv(fd, buf, sizeof buf, 0)) > 0)
                    got += r;
                if (r == 0) {
                    short_reads += got < total;
                    goto out;
                }
                if (r < 0 && errno != EAGAIN) {
                    errors++;
                    goto out;
                }
            }
        }
    }
out:
    close(fd);
    double elapsed = now() - t0;
    done_n = got >= total;
    timeouts = got < total && !errors && !short_reads;
    lat[nlat++] = elapsed;
    report(elapsed, cpu_seconds() - cpu0, (double)got);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen tcp-short|udp|bulk -p PORT [-H HOST] [-c CONC] [-n COUNT]\n"
            "               [-t SECONDS] [-s SIZE] [-e] [-T UDP_TIMEOUT_MS] [-m MB]\n");
    exit(64);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    mode = argv[1];
    int opt;
    optind = 2;
    while ((opt = getopt(argc, argv, "H:p:c:n:t:s:eT:m:")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': conc = atoi(optarg); break;
        case 'n': count = atol(optarg); break;
        case 't': seconds = atof(optarg); break;
        case 's': size = atoi(optarg); break;
        case 'e': until_eof = 1; break;
        case 'T': udp_timeout_ms = atoi(optarg); break;
        case 'm': megabytes = atof(optarg); break;
        default: usage();
        }
    }
    if (port <= 0 || port > 65535 || conc < 1 || conc > MAX_CONC || size < 1 ||
        size > MAX_SIZE || count < 1 || seconds <= 0)
        usage();
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1)
        usage();
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < MAX_SIZE; i++)
        payload[i] = 'a' + i % 26;
    lat = malloc(sizeof *lat * (count + MAX_CONC + 1));
    if (!lat)
        die("malloc");
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");
    if (strcmp(mode, "tcp-short") == 0)
        run_tcp_short();
    else if (strcmp(mode, "udp") == 0)
        run_udp();
    else if (strcmp(mode, "bulk") == 0)
        run_bulk();
    else
        usage();
    return 0;
}
