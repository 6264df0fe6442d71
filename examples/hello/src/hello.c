/* SPDX-License-Identifier: MIT */
/*
 * vmharness-hello: print a greeting, or write it to a file.
 *
 *   vmharness-hello                  print the greeting on stdout
 *   vmharness-hello --output FILE    write it to FILE instead
 *
 * Exit status: 0 on success, 1 when the greeting cannot be written,
 * 2 on a usage error.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "message.h"

static void usage(FILE *f) {
        fputs("usage: vmharness-hello [--output FILE]\n", f);
}

static int write_greeting(FILE *f, const char *name) {
        if (fprintf(f, "%s\n", HELLO_MESSAGE) < 0 || fflush(f) != 0) {
                fprintf(stderr, "vmharness-hello: writing to %s: %s\n", name, strerror(errno));
                return -1;
        }
        return 0;
}

int main(int argc, char *argv[]) {
        const char *output = NULL;

        for (int i = 1; i < argc; i++) {
                if (strcmp(argv[i], "--help") == 0) {
                        usage(stdout);
                        return EXIT_SUCCESS;
                } else if (strcmp(argv[i], "--output") == 0) {
                        if (i + 1 >= argc) {
                                fputs("vmharness-hello: --output needs a FILE\n", stderr);
                                usage(stderr);
                                return 2;
                        }
                        output = argv[++i];
                } else {
                        fprintf(stderr, "vmharness-hello: unexpected argument '%s'\n", argv[i]);
                        usage(stderr);
                        return 2;
                }
        }

        if (!output)
                return write_greeting(stdout, "stdout") < 0 ? EXIT_FAILURE : EXIT_SUCCESS;

        FILE *f = fopen(output, "we");
        if (!f) {
                fprintf(stderr, "vmharness-hello: cannot open %s: %s\n", output, strerror(errno));
                return EXIT_FAILURE;
        }
        int r = write_greeting(f, output);
        if (fclose(f) != 0 && r == 0) {
                fprintf(stderr, "vmharness-hello: closing %s: %s\n", output, strerror(errno));
                r = -1;
        }
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
