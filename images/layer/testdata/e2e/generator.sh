#!/bin/sh
# Runs at boot only if the layer was in place before PID 1 started.
echo "generator ran with $*" >/run/vmharness-layer-generator.ran
