#!/bin/sh
echo "hello from the layer"
