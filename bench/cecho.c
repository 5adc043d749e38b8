/*
 * cecho: the simplest fast echo server, one thread and one epoll loop, TCP and UDP on
 * the same port. It is the benchmark's ceiling: what loadgen measures against it is
 * the most this machine can show, so a server that comes close is limited by loadgen
 * or the kernel, not by itself.
 *
 *   cecho PORT        (listens on 127.0.0.1:PORT, tcp and udp; runs until killed)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUFSZ 65536

struct conn {
    int fd;
    size_t pending, off;    /* bytes read but not yet written back */
    char buf[BUFSZ];
};

static int ep, tcp_fd, udp_fd;

static void drop(struct conn *c)
{
    close(c->fd);
    free(c);
}

static void serve(struct conn *c)
{
    for (;;) {
        while (c->pending) {
            ssize_t w = send(c->fd, c->buf + c->off, c->pending, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EAGAIN) {
                    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    return;
                }
                drop(c);
                return;
            }
            c->off += w;
            c->pending -= w;
        }
        ssize_t r = recv(c->fd, c->buf, BUFSZ, 0);
        if (r == 0 || (r < 0 && errno != EAGAIN)) {
            drop(c);
            return;
        }
        if (r < 0) {
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
            return;
        }
        c->pending = r;
        c->off = 0;
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: cecho PORT\n");
        return 64;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    int one = 1;
    tcp_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    udp_fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    setsockopt(tcp_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(tcp_fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(tcp_fd, 4096) < 0 ||
        bind(udp_fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("cecho: bind");
        return 71;
    }
    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &tcp_fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, tcp_fd, &ev);
    ev.data.ptr = &udp_fd;
    epoll_ctl(ep, EPOLL_CTL_ADD, udp_fd, &ev);
    static char dgram[BUFSZ];
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            void *p = events[i].data.ptr;
            if (p == &tcp_fd) {
                int fd;
                while ((fd = accept4(tcp_fd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    struct conn *c = malloc(sizeof *c);
                    c->fd = fd;
                    c->pending = c->off = 0;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
            } else if (p == &udp_fd) {
                struct sockaddr_storage from;
                socklen_t len;
                ssize_t r;
                while (len = sizeof from,
                       (r = recvfrom(udp_fd, dgram, BUFSZ, 0, (struct sockaddr *)&from, &len)) >= 0)
                    sendto(udp_fd, dgram, r, 0, (struct sockaddr *)&from, len);
            } else {
                serve(p);
            }
        }
    }
}
