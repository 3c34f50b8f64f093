#!/usr/bin/env bash
# The secrets docker-compose.yml mounts: a bearer token for every gRPC call and the Redis
# password, random. Existing ones are kept.
# Compose mounts a file secret with its host owner and mode, so the files must be readable by the
# image's user (uid 10001), i.e. world-readable (0444); the directory (0700), which no container
# sees, keeps other users of this machine out.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p secrets models
chmod 700 secrets
for name in vla_rl_token redis_password; do
  file="secrets/$name.txt"
  if [ ! -s "$file" ]; then
    (umask 077 && openssl rand -hex 32 > "$file")
  fi
  chmod 444 "$file"
done
echo "secrets in $(pwd)/secrets"
