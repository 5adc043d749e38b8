/*
 * logsink: a syslog socket that reads as fast as it can, for the benchmark. netd logs
 * every connection to it as it would to /dev/log in production; reading it costs the
 * machine about what rsyslogd's input costs, and no Python thread in the bench.
 *
 *   logsink PATH     bind a Unix datagram socket at PATH (mode 0666), read until
 *                    SIGTERM or SIGINT, then print the number of lines read and exit.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static volatile sig_atomic_t stopping;

static void stop(int sig) { (void)sig; stopping = 1; }

int main(int argc, char **argv) {
    if (argc != 2 || strlen(argv[1]) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        fprintf(stderr, "usage: logsink PATH\n");
        return 64;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = stop;  /* no SA_RESTART: recv returns EINTR and the loop ends */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int fd = socket(AF_UNIX, SOCK_DGRAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, argv[1]);
    unlink(argv[1]);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("logsink: bind");
        return 71;
    }
    chmod(argv[1], 0666);  /* as /dev/log: spawners run as other users */
    int size = 1 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    char buf[65536];
    unsigned long lines = 0;
    while (!stopping) {
        if (recv(fd, buf, sizeof buf, 0) > 0)
            lines++;
    }
    unlink(argv[1]);
    printf("%lu\n", lines);
    return 0;
}
