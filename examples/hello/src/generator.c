/* SPDX-License-Identifier: MIT */
/*
 * vmharness-hello-generator: a systemd generator (systemd.generator(7)).
 *
 * systemd runs it early at boot and on every daemon-reload as
 *
 *   vmharness-hello-generator NORMAL_DIR [EARLY_DIR LATE_DIR]
 *
 * It writes a drop-in for vmharness-hello.service into NORMAL_DIR that sets
 * the unit's description to "vmharness-hello: " and the greeting, so
 * `systemctl show -P Description vmharness-hello.service` shows which
 * build's generator ran. Generators run in a read-only sandbox; their
 * output directories are the only places they may write.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "message.h"

#define UNIT "vmharness-hello.service"
#define DROPIN "50-vmharness-hello-generator.conf"

/* Writes s as a unit file value: '%' starts a specifier and is doubled. */
static int put_unit_value(FILE *f, const char *s) {
        for (; *s; s++) {
                if (*s == '%' && fputc('%', f) == EOF)
                        return -1;
                if (fputc(*s, f) == EOF)
                        return -1;
        }
        return 0;
}

int main(int argc, char *argv[]) {
        char dir[4096], path[4096];

        if (argc != 2 && argc != 4) {
                fputs("usage: vmharness-hello-generator NORMAL_DIR [EARLY_DIR LATE_DIR]\n", stderr);
                return 2;
        }

        if ((size_t) snprintf(dir, sizeof dir, "%s/" UNIT ".d", argv[1]) >= sizeof dir ||
            (size_t) snprintf(path, sizeof path, "%s/" DROPIN, dir) >= sizeof path) {
                fprintf(stderr, "vmharness-hello-generator: output directory name too long: %s\n", argv[1]);
                return EXIT_FAILURE;
        }
        if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
                fprintf(stderr, "vmharness-hello-generator: cannot create %s: %s\n", dir, strerror(errno));
                return EXIT_FAILURE;
        }

        FILE *f = fopen(path, "we");
        if (!f) {
                fprintf(stderr, "vmharness-hello-generator: cannot create %s: %s\n", path, strerror(errno));
                return EXIT_FAILURE;
        }
        int r = 0;
        if (fputs("# Written by vmharness-hello-generator.\n"
                  "[Unit]\n"
                  "Description=vmharness-hello: ", f) == EOF ||
            put_unit_value(f, HELLO_MESSAGE) < 0 ||
            fputc('\n', f) == EOF)
                r = -1;
        if (fclose(f) != 0)
                r = -1;
        if (r < 0) {
                fprintf(stderr, "vmharness-hello-generator: writing %s: %s\n", path, strerror(errno));
                return EXIT_FAILURE;
        }
        return EXIT_SUCCESS;
}
