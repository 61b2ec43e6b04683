#!/bin/sh
# mmdebstrap --customize-hook for the CI stand-in base (docker/standin-base.sh): $1 is the new root.
# Adds the host's extra CA certificates, so that apt and pip inside `docker build` trust a
# TLS-intercepting proxy the host trusts.
set -eu
root="$1"
found=0
for ca in /usr/local/share/ca-certificates/*.crt; do
    [ -f "$ca" ] || continue
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp "$ca" "$root/usr/local/share/ca-certificates/"
    found=$((found + 1))
done
if [ "$found" -gt 0 ]; then
    chroot "$root" update-ca-certificates >/dev/null
fi
echo "standin-customize.sh: $found host CA certificate(s) added"
