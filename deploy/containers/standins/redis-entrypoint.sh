#!/bin/sh
# As the official redis image's entrypoint does: `redis-server` given no config file (only
# options) runs with `--protected-mode no`, so other containers of the network reach it.
if [ "$1" = redis-server ] && { [ $# -eq 1 ] || [ "${2#-}" != "$2" ]; }; then
    shift
    set -- redis-server --protected-mode no "$@"
fi
exec "$@"
