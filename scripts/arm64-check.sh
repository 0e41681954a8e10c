#!/usr/bin/env bash
# arm64 check: proves that ortft's device side trains on aarch64 with stock onnxruntime's aarch64 wheel
# and gets the same losses as on this x86_64 machine. It builds (once, cached) a Debian bookworm arm64
# root that runs under qemu-user emulation, installs ortft there (device dependencies only: the
# onnxruntime, numpy, tokenizers, safetensors, ... aarch64 wheels), has the x86 host venv (.venv, which
# has `ortft prepare`) make a tiny bundle, trains it for 3 steps on both architectures with identical
# settings (--seed 0 --threads 1), and compares the per-step losses (relative difference <= 1e-4).
#
# Usage: scripts/arm64-check.sh [--root-only] [--steps N] [--tol X]
#   --root-only   build (or check) the cached arm64 root and its venv, then stop
#   ORTFT_ARM64_CACHE   where the root lives (default /var/cache/ortft-arm64)
#   ORTFT_ARM64_MIRROR  the Debian mirror (default: the one apt is configured with)
# Needs root on Linux x86_64 (debootstrap, chroot, mounts) and the host venv (scripts/setup.sh).
# First run ~20 min (debootstrap ~10, pip under emulation ~7); later runs a few minutes.
# Too slow for every CI run: not part of scripts/test.sh. Everything it mounts is unmounted on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

root_only=0
steps=3
tol=1e-4
while [ $# -gt 0 ]; do
  case "$1" in
    --root-only) root_only=1 ;;
    --steps) [ $# -ge 2 ] || { echo "error: --steps needs a value" >&2; exit 2; }; steps=$2; shift ;;
    --tol) [ $# -ge 2 ] || { echo "error: --tol needs a value" >&2; exit 2; }; tol=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$steps" in ''|*[!0-9]*) echo "error: --steps must be a positive integer, not '$steps'" >&2; exit 2 ;; esac
python3 -c "import sys; float(sys.argv[1])" "$tol" 2>/dev/null || { echo "error: --tol must be a number, not '$tol'" >&2; exit 2; }

log() { echo "[arm64-check] $*"; }
die() { echo "[arm64-check] FAIL: $*" >&2; exit 1; }
now() { date +%s; }
[ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ] || die "runs on Linux x86_64 (this is $(uname -s) $(uname -m))"
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mounts)"

CACHE=${ORTFT_ARM64_CACHE:-/var/cache/ortft-arm64}
ROOT="$CACHE/root"
SUITE=bookworm
VENV_IN=/opt/ortft-venv           # inside the root
SRC_IN=/opt/ortft-src             # inside the root: a copy of this tree's package source
mkdir -p "$CACHE"
t_start=$(now)

# ---- mounts: every one is recorded and unmounted on exit, newest first --------------------------
MOUNTS=()
WORK=""
cleanup() {
  local i
  for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do
    umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" 2>/dev/null || echo "[arm64-check] could not unmount ${MOUNTS[$i]}" >&2
  done
  MOUNTS=()
  if [ -n "$WORK" ]; then rm -rf --one-file-system "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Unmount whatever a killed earlier run left mounted below $1 (never delete through a mount).
unmount_below() {
  local m
  for m in $(awk -v p="$1" 'index($2, p"/") == 1 || $2 == p {print $2}' /proc/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
}
bind() {  # bind SRC DST [ro]  (a folder or a file)
  if [ -d "$1" ]; then mkdir -p "$2"; elif [ ! -e "$2" ]; then mkdir -p "$(dirname "$2")"; touch "$2"; fi
  mount --bind "$1" "$2"; MOUNTS+=("$2")
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2"; fi
}

# ---- host tools: qemu-user-static, debootstrap, binfmt_misc ----------------------------------
if ! command -v debootstrap >/dev/null || ! command -v qemu-aarch64-static >/dev/null || ! command -v update-binfmts >/dev/null; then
  log "installing qemu-user-static debootstrap binfmt-support"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q qemu-user-static debootstrap binfmt-support >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; MOUNTS+=(/proc/sys/fs/binfmt_misc)  # unmounted on exit too
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null || die "qemu-aarch64 is not registered with binfmt_misc"

# ---- the Debian mirror apt is configured with ------------------------------------------------
debian_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # deb822: the first paragraph of type deb whose suites include the plain release (not -security)
    awk 'BEGIN{RS=""; FS="\n"} {
           uris=""; suites=""; types=""
           for (i=1;i<=NF;i++) {
             if ($i ~ /^URIs:/) { uris=$i; sub(/^URIs:[ \t]*/, "", uris) }
             if ($i ~ /^Suites:/) { suites=" " $i " " }
             if ($i ~ /^Types:/) { types=$i }
           }
           if (types ~ /deb( |$)/ && suites ~ / (bookworm|bullseye|trixie|sid|stable) / && uris !~ /security/) { split(uris, u, " "); print u[1]; exit }
         }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    sed -e 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" && $2 !~ /security/ && $3 ~ /^(bookworm|bullseye|trixie|sid|stable)$/ {print $2; exit}'
  done
}
MIRROR=${ORTFT_ARM64_MIRROR:-$(debian_mirror | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

# ---- the arm64 root (debootstrap, once) ------------------------------------------------------
t0=$(now)
if [ ! -f "$ROOT/.ortft-root-done" ]; then
  # An interrupted build is thrown away (after unmounting anything a killed debootstrap left mounted).
  for d in "$ROOT" "$ROOT.tmp"; do
    if [ -e "$d" ]; then unmount_below "$d"; rm -rf --one-file-system "$d"; fi
  done
  log "debootstrap --arch=arm64 $SUITE from $MIRROR (about 10 min; log: $CACHE/debootstrap.log)"
  if ! debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
      "$SUITE" "$ROOT.tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
    tail -20 "$CACHE/debootstrap.log" >&2
    unmount_below "$ROOT.tmp"
    die "debootstrap failed (see $CACHE/debootstrap.log)"
  fi
  unmount_below "$ROOT.tmp"
  touch "$ROOT.tmp/.ortft-root-done"
  mv "$ROOT.tmp" "$ROOT"
  log "root built in $(( $(now) - t0 )) s"
fi
t_root=$(( $(now) - t0 ))

# ---- what the root needs from this machine: DNS, pip's configuration, CA bundle ---------------
copy_in() {  # copy a host file to the same path inside the root
  [ -f "$1" ] || return 0
  mkdir -p "$ROOT$(dirname "$1")"
  cp -fL "$1" "$ROOT$1"
}
copy_in /etc/resolv.conf
copy_in /etc/hosts
for f in /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf" "${PIP_CONFIG_FILE:-}"; do
  [ -n "$f" ] && copy_in "$f"
done
for f in /etc/ssl/certs/ca-certificates.crt "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}"; do
  [ -n "$f" ] && copy_in "$f"
done
# Local paths that pip's configuration or PIP_* variables name (a constraints file, find-links folders,
# file:// indexes, a cert): files are copied, folders bind-mounted read-only at the same path. A file://
# index's parent folder is mounted (an index's pages may link to files beside it: /x/simple -> /x/files).
pip_local_paths() {
  { python3 -m pip config list 2>/dev/null | sed -e "s/^[^=]*=//" -e "s/^'//" -e "s/'$//"
    env | grep '^PIP_' | sed 's/^[^=]*=//'
  } | tr ' ' '\n' | sed -E -e 's#^file://(/.*[^/])/?$#\1/..#' | grep '^/' \
    | while IFS= read -r p; do if [ -e "$p" ]; then realpath -m "$p"; fi; done | sort -u || true
}
mapfile -t PIP_PATHS < <(pip_local_paths)

# qemu-user 7.2 (bookworm's) shows the emulated program the x86 host's /proc/cpuinfo. ORT's cpuinfo
# library then fails: with /sys mounted too, `import onnxruntime` segfaults; with /proc alone it warns
# "cpuinfo_initialize failed" and detects no CPU features. So the emulated CPU is a fixed, common
# aarch64 core (Neoverse-N1: AWS Graviton2, Ampere Altra; ORTFT_ARM64_CPU overrides) and the root sees
# an aarch64 /proc/cpuinfo that describes it, one entry per host core (sysfs lists the same cores).
QEMU_CPU_MODEL=${ORTFT_ARM64_CPU:-neoverse-n1}
write_cpuinfo() {
  local i
  for ((i=0; i<$(nproc --all); i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$i"
  done
}
mount_all() {
  mkdir -p "$ROOT/proc" "$ROOT/sys" "$ROOT/dev"
  mount -t proc proc "$ROOT/proc"; MOUNTS+=("$ROOT/proc")
  write_cpuinfo > "$CACHE/cpuinfo"
  bind "$CACHE/cpuinfo" "$ROOT/proc/cpuinfo" ro
  bind /sys "$ROOT/sys" ro       # ORT's cpuinfo reads the lists of present/possible cores there
  bind /dev "$ROOT/dev"
  local p
  for p in "${PIP_PATHS[@]}"; do
    if [ -d "$p" ]; then bind "$p" "$ROOT$p" ro; elif [ -f "$p" ]; then copy_in "$p"; fi
  done
}
# Inside the root: a clean environment plus pip's and the proxy variables of this machine.
in_root() {
  local -a envs=(HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
                 "QEMU_CPU=$QEMU_CPU_MODEL")
  local v
  while IFS= read -r v; do envs+=("$v"); done < <(env | grep -E '^(PIP_[A-Z_]*|https?_proxy|HTTPS?_PROXY|no_proxy|NO_PROXY)=' || true)
  QEMU_CPU=$QEMU_CPU_MODEL chroot "$ROOT" /usr/bin/env -i "${envs[@]}" "$@"
}
mount_all
[ "$(in_root uname -m)" = aarch64 ] || die "the root does not run as aarch64"

# ---- the venv inside the root: ortft's core dependencies (stock onnxruntime's aarch64 wheel) ------
# ortft's source is copied in (the working tree, as the x86 run uses it) and installed without deps
# whenever it changes; the dependencies are installed when pyproject.toml or this script changes.
t0=$(now)
src_hash=$( { cat pyproject.toml README.md; find ortft -name '*.py' -print0 | sort -z | xargs -0 cat; } | sha256sum | cut -d' ' -f1)
deps_hash=$(cat pyproject.toml scripts/arm64-check.sh | sha256sum | cut -d' ' -f1)
venv_stamp="$ROOT$VENV_IN/.ortft-deps-stamp"
src_stamp="$ROOT$VENV_IN/.ortft-src-stamp"
refresh_src() {
  rm -rf "$ROOT$SRC_IN"; mkdir -p "$ROOT$SRC_IN"
  cp -r pyproject.toml README.md ortft "$ROOT$SRC_IN/"
  [ -f LICENSE ] && cp LICENSE "$ROOT$SRC_IN/"
  find "$ROOT$SRC_IN" -name __pycache__ -prune -exec rm -rf {} +
}
pip_in() {
  local out
  out=$(in_root "$VENV_IN/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1) || { echo "$out" >&2; return 1; }
  [ -z "$out" ] || echo "$out" | grep -v '^WARNING: Location' || true
}
if [ ! -f "$venv_stamp" ] || [ "$(cat "$venv_stamp")" != "$deps_hash" ]; then
  log "installing ortft and its device dependencies in the arm64 root (about 7 min under emulation)"
  [ -x "$ROOT$VENV_IN/bin/python" ] || in_root python3 -m venv "$VENV_IN"
  refresh_src
  pip_in "setuptools>=77" wheel || die "pip could not install setuptools in the arm64 root"
  pip_in --no-build-isolation "$SRC_IN" || die "pip could not install ortft's dependencies in the arm64 root"
  in_root "$VENV_IN/bin/python" -c "import onnxruntime, numpy, tokenizers, safetensors, ortft.cli" \
    || die "the arm64 venv is broken: see the pip output above"
  echo "$deps_hash" > "$venv_stamp"
  echo "$src_hash" > "$src_stamp"
elif [ ! -f "$src_stamp" ] || [ "$(cat "$src_stamp")" != "$src_hash" ]; then
  log "ortft's source changed: reinstalling it in the arm64 root"
  refresh_src
  pip_in --no-deps --no-build-isolation --force-reinstall "$SRC_IN" || die "pip could not reinstall ortft in the arm64 root"
  echo "$src_hash" > "$src_stamp"
fi
t_venv=$(( $(now) - t0 ))
n_ort=$(in_root "$VENV_IN/bin/python" -m pip list 2>/dev/null | grep -ciE '^onnxruntime(-[a-z0-9-]+)? ' || true)
[ "$n_ort" = 1 ] || die "the arm64 venv holds $n_ort packages that provide the module onnxruntime"
arm_versions=$(in_root "$VENV_IN/bin/python" -c "import platform, onnxruntime, numpy; print(platform.machine(), 'python', platform.python_version(), 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), 'numpy', numpy.__version__)" 2>&1) \
  || die "onnxruntime does not load in the arm64 root: $arm_versions"
log "arm64 root (qemu CPU $QEMU_CPU_MODEL): $arm_versions"
if [ "$root_only" = 1 ]; then
  log "ok: root ready in $ROOT (root ${t_root} s, venv ${t_venv} s)"
  exit 0
fi

# ---- the tiny bundle, made by the x86 host ---------------------------------------------------
[ -x .venv/bin/ortft ] || die "the host venv .venv is missing: run scripts/setup.sh"
[ -f data/sft/train.jsonl ] || die "data/sft/train.jsonl is missing"
mkdir -p "$ROOT/tmp"
WORK=$(mktemp -d "$ROOT/tmp/ortft-arm64-check.XXXXXX")
W_IN=${WORK#"$ROOT"}
t0=$(now)
.venv/bin/python -m ortft.prepare.tiny "$WORK/model" >/dev/null
.venv/bin/ortft prepare "$WORK/model" --out "$WORK/bundle" --rank 4 --alpha 8 >/dev/null 2>"$WORK/prepare.log" \
  || { cat "$WORK/prepare.log" >&2; die "ortft prepare failed on the host"; }
cp data/sft/train.jsonl "$WORK/train.jsonl"
t_prepare=$(( $(now) - t0 ))

train_args=(--steps "$steps" --batch-size 2 --seq-len 32 --threads 1 --seed 0 --provider cpu)
t0=$(now)
if ! .venv/bin/ortft train "$WORK/bundle" --data "$WORK/train.jsonl" --out "$WORK/run-x86" "${train_args[@]}" >"$WORK/train-x86.log" 2>&1; then
  cat "$WORK/train-x86.log" >&2; die "ortft train failed on x86_64"
fi
t_x86=$(( $(now) - t0 ))
t0=$(now)
if ! in_root "$VENV_IN/bin/ortft" train "$W_IN/bundle" --data "$W_IN/train.jsonl" --out "$W_IN/run-arm64" "${train_args[@]}" >"$WORK/train-arm64.log" 2>&1; then
  cat "$WORK/train-arm64.log" >&2; die "ortft train failed on aarch64"
fi
t_arm=$(( $(now) - t0 ))
x86_versions=$(.venv/bin/python -c "import platform, onnxruntime, numpy; print(platform.machine(), 'python', platform.python_version(), 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)")

log "x86 host: $x86_versions"
log "train: ${train_args[*]}"
python3 - "$WORK/run-x86/metrics.jsonl" "$WORK/run-arm64/metrics.jsonl" "$tol" "$steps" <<'EOF'
import json, sys
def losses(path):
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            if "loss" in rec and "step" in rec:
                out[int(rec["step"])] = float(rec["loss"])
    return out
x86, arm = losses(sys.argv[1]), losses(sys.argv[2])
tol, steps = float(sys.argv[3]), int(sys.argv[4])
print(f"{'step':>4}  {'x86_64 loss':>14}  {'aarch64 loss':>14}  {'rel diff':>9}")
worst = 0.0
for step in sorted(set(x86) | set(arm)):
    a, b = x86.get(step), arm.get(step)
    if a is None or b is None:
        print(f"{step:>4}  {a!s:>14}  {b!s:>14}  missing"); worst = float("inf"); continue
    rel = abs(a - b) / max(abs(a), 1e-12)
    worst = max(worst, rel)
    print(f"{step:>4}  {a:>14.8f}  {b:>14.8f}  {rel:>9.2e}")
if len(x86) < steps or len(arm) < steps:
    print(f"[arm64-check] FAIL: expected {steps} steps, got x86 {len(x86)}, arm64 {len(arm)}"); sys.exit(1)
if worst > tol:
    print(f"[arm64-check] FAIL: losses differ by {worst:.2e} relative (> {tol:g})"); sys.exit(1)
print(f"[arm64-check] losses agree: max relative difference {worst:.2e} <= {tol:g}")
for label, path in (("x86_64", sys.argv[1]), ("aarch64 (emulated)", sys.argv[2])):
    summary = json.load(open(path.replace("metrics.jsonl", "summary.json")))
    if summary.get("train_seconds"):
        print(f"[arm64-check] {label}: {summary['step'] / summary['train_seconds']:.2f} steps/s, "
              f"{summary.get('tokens_per_s', 0):.0f} tok/s, peak RSS {summary.get('peak_rss_mb', 0):.0f} MB")
EOF
log "times: root ${t_root} s (cached after the first run), arm64 venv ${t_venv} s, prepare (x86) ${t_prepare} s, train x86 ${t_x86} s, train arm64 (emulated) ${t_arm} s, total $(( $(now) - t_start )) s"
log "ok: ortft trains on aarch64 with stock onnxruntime and matches x86_64"
