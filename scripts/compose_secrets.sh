#!/usr/bin/env bash
# The secrets docker-compose.yml mounts: a bearer token for every gRPC call and the Redis
# password, random, readable by this user only. Existing ones are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p secrets models
chmod 700 secrets
for name in vla_rl_token redis_password; do
  file="secrets/$name.txt"
  if [ ! -s "$file" ]; then
    (umask 077 && openssl rand -hex 32 > "$file")
  fi
done
echo "secrets in $(pwd)/secrets"
