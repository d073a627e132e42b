#!/usr/bin/env bash
# liger-proxy: writes nginx's configuration for liger-serve replicas and runs nginx in the
# foreground. Installed as /usr/local/bin/liger-proxy by docker/Dockerfile.proxy.
#
#   LIGER_PROXY_UPSTREAMS  the replicas, host:port separated by blanks (required)
#   LIGER_PROXY_LISTEN     what nginx listens on: a port or address:port (default 8080)
#   LIGER_PROXY_HASH       the request value hashed to pick a replica
#                          (default $http_x_conversation_id: the X-Conversation-Id header)
#
# `liger-proxy health` exits 0 when nginx answers on LIGER_PROXY_LISTEN (the image's
# HEALTHCHECK).
#
# Why these settings:
# - `hash ... consistent`: a conversation keeps its replica, and when one goes away only its
#   conversations move (ketama), as ingress-nginx's upstream-hash-by does.
# - `proxy_next_upstream error timeout`: a replica that refuses connections (stopped, or
#   draining on SIGTERM) is skipped; a request already sent is never replayed on another
#   replica (nginx does not retry POSTs once sent), so a generation is never run twice.
# - `proxy_buffering off` and long read timeouts: server-sent events stream token by token.
# - The X-Liger-Upstream response header names the replica that answered (for debugging and
#   for tests/docker).
set -euo pipefail

listen="${LIGER_PROXY_LISTEN:-8080}"
if [[ "${1:-}" == health ]]; then
  host=127.0.0.1
  [[ "$listen" == *:* ]] && host="${listen%:*}"
  exec 3<>"/dev/tcp/$host/${listen##*:}" || exit 1
  printf 'GET /proxy-health HTTP/1.0\r\n\r\n' >&3
  IFS= read -r -t 5 status <&3 || exit 1
  [[ "$status" == *" 200 "* ]]
  exit
fi

upstreams="${LIGER_PROXY_UPSTREAMS:-}"
[[ -n "${upstreams// /}" ]] || { echo "liger-proxy: set LIGER_PROXY_UPSTREAMS (host:port ...)" >&2; exit 1; }
hash="${LIGER_PROXY_HASH:-\$http_x_conversation_id}"
conf=/tmp/liger-proxy/nginx.conf
mkdir -p /tmp/liger-proxy

servers=""
for u in $upstreams; do
  servers+="    server $u max_fails=1 fail_timeout=10s;"$'\n'
done

cat >"$conf" <<CONF
worker_processes auto;
pid /tmp/liger-proxy/nginx.pid;
error_log stderr warn;
events { worker_connections 1024; }
http {
  access_log /dev/stdout;
  client_body_temp_path /tmp/liger-proxy/body;
  proxy_temp_path /tmp/liger-proxy/proxy;
  fastcgi_temp_path /tmp/liger-proxy/fastcgi;
  uwsgi_temp_path /tmp/liger-proxy/uwsgi;
  scgi_temp_path /tmp/liger-proxy/scgi;
  client_max_body_size 32m;

  upstream liger {
    hash $hash consistent;
$servers    keepalive 16;
  }

  server {
    listen $listen;
    location = /proxy-health { return 200 "ok\n"; }
    location / {
      proxy_pass http://liger;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_buffering off;
      proxy_connect_timeout 5s;
      proxy_read_timeout 600s;
      proxy_send_timeout 600s;
      proxy_next_upstream error timeout;
      proxy_next_upstream_tries 2;
      add_header X-Liger-Upstream \$upstream_addr always;
    }
  }
}
CONF
echo "liger-proxy: listening on $listen, hashing $hash over: $upstreams" >&2
exec nginx -c "$conf" -g 'daemon off;'
