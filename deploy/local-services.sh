#!/usr/bin/env bash
# Make sure the local MariaDB/MySQL, Redis and RabbitMQ answer; start the ones that are installed but
# stopped. A server that answers is left exactly as it is: never restarted, reconfigured or given a plugin
# (CI enables what it needs itself, in .ci/run). Usage: deploy/local-services.sh [ensure|check]
#   check   only report; exit 1 naming the first service that does not answer
#   ensure  start what is installed but stopped (saying so), wait until all answer
set -uo pipefail
mode=${1:-ensure}

MYSQL_HOST=${MYSQL_HOST:-127.0.0.1}; MYSQL_PORT=${MYSQL_PORT:-3306}
REDIS_HOST=127.0.0.1; REDIS_PORT=6379
AMQP_HOST=127.0.0.1; AMQP_PORT=5672

answers() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() { # name host port seconds
    local i
    for ((i = 0; i < $4 * 10; i++)); do answers "$2" "$3" && return 0; sleep 0.1; done
    echo "error: $1 does not answer on $2:$3 after $4s" >&2
    return 1
}

start_mysql() {
    if command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ]; then
        start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    elif command -v mysqld >/dev/null 2>&1; then
        start-stop-daemon --start --oknodo --background --exec "$(command -v mysqld)"
    else
        return 1
    fi
}
start_redis() {
    command -v redis-server >/dev/null 2>&1 || return 1
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
}
start_rabbitmq() {
    command -v rabbitmq-server >/dev/null 2>&1 || return 1
    rabbitmq-server -detached
}

hint() {
    case $1 in
        MySQL) echo "start MariaDB/MySQL on $MYSQL_HOST:$MYSQL_PORT (or run 'docker compose up mysql')" ;;
        Redis) echo "start redis-server on $REDIS_HOST:$REDIS_PORT (or run 'docker compose up redis')" ;;
        RabbitMQ) echo "start rabbitmq-server on $AMQP_HOST:$AMQP_PORT (or run 'docker compose up rabbitmq')" ;;
    esac
}

status=0
for svc in "MySQL $MYSQL_HOST $MYSQL_PORT start_mysql" "Redis $REDIS_HOST $REDIS_PORT start_redis" \
           "RabbitMQ $AMQP_HOST $AMQP_PORT start_rabbitmq"; do
    set -- $svc
    if answers "$2" "$3"; then
        [ "$mode" = ensure ] && echo "$1 answers on $2:$3: left as it is" >&2
        continue
    fi
    if [ "$mode" = check ]; then
        echo "error: $1 does not answer on $2:$3; $(hint "$1")" >&2
        exit 1
    fi
    echo "$1 is not answering on $2:$3; starting it" >&2
    if ! "$4" >/dev/null 2>&1; then
        echo "error: $1 is not installed here; $(hint "$1")" >&2
        status=1
        continue
    fi
    wait_for "$1" "$2" "$3" 60 || status=1
done
[ $status -eq 0 ] || exit $status

exit 0
