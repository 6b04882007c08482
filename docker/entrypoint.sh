#!/bin/sh
# Entry point of the fedsparse images. The first word picks the role:
#
#   superlink [FLAGS]   flower-superlink, runtime dependency installation off (the image is complete)
#   supernode [FLAGS]   flower-supernode (give --superlink HOST:PORT and --node-config)
#   flwr-run  [FLAGS]   `flwr run /app` against $SUPERLINK_ADDRESS, streaming the run's logs
#   anything else       run as given (e.g. `fedsparse run ...`, `flwr ls ...`, `bash`)
#
# With SUPERLINK_ADDRESS=host:port set, $FLWR_HOME/config.toml gets a default connection named
# `deployment` for the `flwr` CLI: TLS verified with the CA in $SUPERLINK_ROOT_CERTIFICATES (or
# the system's), or plain HTTP with SUPERLINK_INSECURE=true.
set -eu

write_connection() {
    # $FLWR_HOME/config.toml with one connection, `deployment`, to the SuperLink.
    mkdir -p "${FLWR_HOME}"
    {
        printf '[superlink]\ndefault = "deployment"\n\n[superlink.deployment]\n'
        printf 'address = "%s"\n' "${SUPERLINK_ADDRESS:?set SUPERLINK_ADDRESS=host:port}"
        if [ "${SUPERLINK_INSECURE:-false}" = "true" ]; then
            printf 'insecure = true\n'
        elif [ -n "${SUPERLINK_ROOT_CERTIFICATES:-}" ]; then
            printf 'root-certificates = "%s"\n' "${SUPERLINK_ROOT_CERTIFICATES}"
        fi
    } > "${FLWR_HOME}/config.toml"
}

if [ -n "${SUPERLINK_ADDRESS:-}" ]; then
    write_connection
fi

role="${1:-}"
case "${role}" in
    superlink)
        shift
        exec flower-superlink --disable-runtime-dependency-installation "$@"
        ;;
    supernode)
        shift
        exec flower-supernode "$@"
        ;;
    flwr-run)
        shift
        : "${SUPERLINK_ADDRESS:?flwr-run needs SUPERLINK_ADDRESS=host:port}"
        exec flwr run /app deployment --stream "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
