/* SPDX-License-Identifier: MIT */
#pragma once

/*
 * The greeting vmharness-hello prints and its generator writes.
 *
 * meson.build reads this line too and passes the message to the integration
 * tests, so that editing it and rebuilding changes both the programs and
 * what the tests expect. Keep it a single plain string literal: no double
 * quotes or backslashes.
 */
#define HELLO_MESSAGE "Hello from vmharness-hello"
