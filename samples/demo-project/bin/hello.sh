#!/bin/sh
echo "hello from $(basename "$0")"
