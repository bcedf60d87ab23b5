#!/usr/bin/env bash
# Build Mosquitto's password file for ebcd from a directory of secrets (docs/install.md).
#
#   make_passwd.sh [-t TERMINALS_CSV] [-s SECRETS_DIR] [-o PASSWORD_FILE] [-g]
#
# Accounts (one secret file each in SECRETS_DIR, named like the user, password on its first line,
# without ':'):
#   ebcd          the daemon (the same password as in ebcd.toml's [mqtt] password_file)
#   upstream*     every upstream alert system that has a secret file (each needs its ACL block)
#   <code>        every terminal of TERMINALS_CSV: its 23-digit resource code is its user name
#   _all          optional, test benches: the secret of every terminal without a file of its own
#                 (`[simulator] credentials_dir` of ebcd.toml reads the same layout)
# Every account of the ledger needs a secret: the script names each missing one and changes
# nothing. -g generates a random secret for each missing account instead (then give the
# terminals theirs when they are provisioned).
#
# The file is written whole to a temporary file, hashed (mosquitto_passwd -U, PBKDF2-SHA512)
# and renamed over PASSWORD_FILE, so the broker never reads half a file. Then:
#   systemctl reload mosquitto
set -euo pipefail
umask 077

terminals=/etc/ebcd/terminals.csv
secrets=/etc/ebcd/mqtt-secrets
out=/etc/mosquitto/ebcd.passwd
generate=0

usage() { sed -n '2,19s/^# \{0,1\}//p' "$0"; }
while getopts "t:s:o:gh" opt; do
  case $opt in
    t) terminals=$OPTARG ;;
    s) secrets=$OPTARG ;;
    o) out=$OPTARG ;;
    g) generate=1 ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

die() { echo "make_passwd.sh: $*" >&2; exit 1; }
command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd not found (apt-get install mosquitto)"
[ -r "$terminals" ] || die "cannot read the terminal ledger $terminals"
[ -d "$secrets" ] || die "no secrets directory $secrets"
[ "$(head -n1 "$terminals" | cut -d, -f1 | tr -d '\r\357\273\277')" = code ] ||
  die "$terminals: the first column must be 'code' (code,name,room,lat,lon,bus_address)"

# The user names, in order, each once: ebcd, upstream systems, then the ledger's terminals.
users=(ebcd)
for f in "$secrets"/upstream*; do
  [ -f "$f" ] && users+=("$(basename "$f")")
done
line=1
while IFS=, read -r code _; do
  line=$((line + 1))
  code=${code%$'\r'}
  [ -z "$code" ] && continue
  [[ $code =~ ^[0-9]{23}$ ]] || die "$terminals:$line: '$code' is not a 23-digit resource code"
  users+=("$code")
done < <(tail -n +2 "$terminals")
mapfile -t users < <(printf '%s\n' "${users[@]}" | awk '!seen[$0]++')

# The secret file of each user: its own, or for a terminal without one the shared _all.
shared="$secrets/_all"
[ ! -e "$shared" ] || [ -s "$shared" ] || die "$shared is empty: delete it or put the shared password in it"
declare -A file_of
for user in "${users[@]}"; do
  file_of[$user]="$secrets/$user"
  if [ ! -e "$secrets/$user" ] && [ -e "$shared" ] && [[ $user =~ ^[0-9]{23}$ ]]; then
    file_of[$user]=$shared
  fi
done

missing=()
for user in "${users[@]}"; do
  f=${file_of[$user]}
  if [ ! -s "$f" ]; then
    if [ "$generate" = 1 ]; then
      # 24 random bytes, base64: no ':' and no newline, which the password file cannot hold.
      head -c 24 /dev/urandom | base64 >"$f"
    else
      missing+=("$user")
    fi
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "make_passwd.sh: ${#missing[@]} account(s) without a secret in $secrets:" >&2
  printf '  %s\n' "${missing[@]:0:20}" >&2
  [ ${#missing[@]} -gt 20 ] && echo "  ... and $((${#missing[@]} - 20)) more" >&2
  die "nothing written (-g generates the missing secrets)"
fi

# In the target's directory, so that the final rename is atomic.
tmp=$(mktemp "$(dirname "$out")/.ebcd.passwd.XXXXXX")
trap 'rm -f "$tmp"' EXIT
for user in "${users[@]}"; do
  f=${file_of[$user]}
  IFS= read -r password <"$f" || true
  password=${password%$'\r'}
  [ -n "$password" ] || die "$f: the first line (the password) is empty"
  # mosquitto_passwd -U reads "user:password" and silently cuts a password at a second ':'.
  [[ $password != *:* ]] || die "$f: the password contains ':', which mosquitto_passwd -U would cut off"
  printf '%s:%s\n' "$user" "$password" >>"$tmp"
done
mosquitto_passwd -U "$tmp"

# Debian's mosquitto reads the file as the user mosquitto; nobody else may read it.
chmod 0640 "$tmp"
if [ "$(id -u)" = 0 ] && getent group mosquitto >/dev/null; then
  chgrp mosquitto "$tmp"
fi
mv -f "$tmp" "$out"
trap - EXIT
echo "wrote $out: ${#users[@]} accounts; now: systemctl reload mosquitto"
