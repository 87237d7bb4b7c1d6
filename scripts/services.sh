#!/usr/bin/env bash
# Make sure the servers the test suite runs against answer on loopback: PostgreSQL on
# 127.0.0.1:5432 (database "test", trust auth) and Redis on 127.0.0.1:6379. Starts a
# stopped one, installs an absent one (Debian packages, as root), and fails, never skips,
# when one still cannot be reached.
set -euo pipefail

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "error: need root to run: $*" >&2; return 1; fi
}

apt_install() {
    command -v apt-get >/dev/null || { echo "error: install $* by hand" >&2; return 1; }
    echo "installing $* (Debian packages) ..." >&2
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq "$@" >/dev/null
}

wait_for() {  # wait_for NAME COMMAND...: up to 20 s
    for _ in $(seq 1 100); do "${@:2}" >/dev/null 2>&1 && return 0; sleep 0.2; done
    echo "error: $1 does not answer" >&2
    return 1
}

redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }

# --- Redis
if ! command -v redis-server >/dev/null; then apt_install redis-server; fi
if ! redis_up; then
    echo "starting Redis on 127.0.0.1:6379 ..." >&2
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_for "Redis on 127.0.0.1:6379" redis_up

# --- PostgreSQL
fresh_pg=no
if ! command -v pg_ctlcluster >/dev/null; then apt_install postgresql; fresh_pg=yes; fi
if ! pg_up; then
    echo "starting PostgreSQL on 127.0.0.1:5432 ..." >&2
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
fi
wait_for "PostgreSQL on 127.0.0.1:5432" pg_up
if [ "$fresh_pg" = yes ] || ! psql -h 127.0.0.1 -d test -tAc 'select 1' >/dev/null 2>&1; then
    # A new cluster: let this user in over loopback without a password, with a "test" db.
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    hba="/etc/postgresql/$version/main/pg_hba.conf"
    user=$(id -un)
    if ! as_root grep -q "^host all all 127.0.0.1/32 trust" "$hba"; then
        as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    fi
    as_root su postgres -c "psql -tAc \"select 1 from pg_roles where rolname='$user'\"" \
        | grep -q 1 || as_root su postgres -c "createuser --superuser $user"
    psql -h 127.0.0.1 -d postgres -tAc "select 1 from pg_database where datname='test'" \
        | grep -q 1 || createdb -h 127.0.0.1 test
fi
psql -h 127.0.0.1 -d test -tAc 'select 1' >/dev/null || {
    echo "error: cannot connect to PostgreSQL database test on 127.0.0.1 as $(id -un)" >&2
    exit 1
}
echo "services: PostgreSQL and Redis answer on 127.0.0.1" >&2
