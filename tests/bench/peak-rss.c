/* peak-rss.c: an LD_PRELOAD library for tests/bench/dag.sh.
 *
 * When a process that loaded it exits normally, it appends one line,
 * "<name> <VmHWM in kB>", to the file named by $BENCH_RSS: the process's own
 * peak resident set. (GNU time's %M is the maximum over the process and every
 * descendant it waited for, so a tool that runs nix-store would report
 * nix-store's peak.) <name> is /proc/self/comm, with the first argument
 * appended when it is an option such as --watchdog or --cancel. A process
 * killed by a signal writes nothing.
 *
 *   cc -shared -fPIC -O2 -o peak-rss.so peak-rss.c
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((destructor)) static void peak_rss_at_exit(void)
{
    const char *log = getenv("BENCH_RSS");
    if (log == NULL || *log == '\0')
        return;

    char name[96] = "?";
    FILE *f = fopen("/proc/self/comm", "r");
    if (f != NULL) {
        if (fgets(name, 32, f) != NULL)
            name[strcspn(name, "\n")] = '\0';
        fclose(f);
    }
    /* argv[1], when it is an option (nsh-hook --watchdog, nsh-alloc --cancel). */
    char cmdline[256];
    int fd = open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
        close(fd);
        if (n > 0) {
            cmdline[n] = '\0';
            size_t first = strlen(cmdline) + 1;
            if ((ssize_t)first < n && strncmp(cmdline + first, "--", 2) == 0)
                snprintf(name + strlen(name), sizeof name - strlen(name), "%.40s", cmdline + first);
        }
    }

    long hwm_kb = -1;
    char line[256];
    f = fopen("/proc/self/status", "r");
    if (f != NULL) {
        while (fgets(line, sizeof line, f) != NULL)
            if (sscanf(line, "VmHWM: %ld", &hwm_kb) == 1)
                break;
        fclose(f);
    }

    char out[160];
    int len = snprintf(out, sizeof out, "%s %ld\n", name, hwm_kb);
    fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) {
        /* One write with O_APPEND: lines of concurrent processes do not mix. */
        if (write(fd, out, (size_t)len) < 0) {
            /* nothing to do: measuring must never disturb the process */
        }
        close(fd);
    }
}
