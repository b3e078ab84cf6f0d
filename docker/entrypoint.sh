#!/bin/sh
# The container's entrypoint (Dockerfile): development certificates at the first start, then the
# gateway itself, exec'd so that it is the process `docker stop` and Kubernetes signal.
#
# The image carries no certificate and no key. When `gateway run` starts and
# $GATEWAY_CERTS_DIR/server.crt is missing, a CA, a server and a client certificate are written
# there with the CA's key discarded after signing (`certs init --no-ca-key`): the default config
# then serves HTTPS and its mTLS route at once, and nobody, not even the holder of the container,
# can mint another client certificate it trusts. Mount real certificates over the directory to
# use them instead (README "Container image"); GATEWAY_DEV_CERTS=0 never writes any.
set -eu

certs="${GATEWAY_CERTS_DIR:-/app/certs}"
if [ "${1:-}" = run ] && [ "${GATEWAY_DEV_CERTS:-1}" != 0 ] && [ ! -e "$certs/server.crt" ]; then
    if [ -d "$certs" ] && [ -w "$certs" ]; then
        # stdout is the gateway's JSON log: the command's lines go to stderr
        gateway certs init --out "$certs" --hosts "${GATEWAY_DEV_HOSTS:-localhost,127.0.0.1}" \
            --no-ca-key >&2
    else
        # a read-only mount without certificates: a config that needs them names the missing file
        echo "gateway-entrypoint: $certs/server.crt is missing and $certs is not writable;" \
            "no development certificates written" >&2
    fi
fi
exec gateway "$@"
