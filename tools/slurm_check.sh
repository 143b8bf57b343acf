#!/usr/bin/env bash
# tools/slurm_check.sh: a one-node Slurm cluster in a temporary folder (munged, slurmctld and
# slurmd on this host, as root, on free ports), then `srun -n N` of a moonshard command; stops
# every daemon it started and removes the folder.
#
#   bash tools/slurm_check.sh [-n N] [moonshard args...]
#       default command: tools/dist_check.lua (rendezvous + all-reduce through SLURM_* variables)
#   bash tools/slurm_check.sh -n 2 generate --model ../shared/data/models/stories260K --tp 2 ...
#
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge) and root. Environment:
# MSH_EXE (default build/moonshard). Exit status: srun's, or 77 when Slurm is not installed or
# this is not root, 1 when the cluster did not come up.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
root=$(pwd)
exe=${MSH_EXE:-$root/build/moonshard}
ntasks=2
if [ "${1:-}" = "-n" ]; then
  ntasks=$2
  shift 2
fi
[ $# -eq 0 ] && set -- "$root/tools/dist_check.lua"

for prog in munged slurmctld slurmd srun sinfo; do
  if ! command -v "$prog" > /dev/null 2>&1; then
    echo "slurm_check: $prog not found (apt-get install slurm-wlm munge)" >&2
    exit 77
  fi
done
if [ "$(id -u)" -ne 0 ]; then
  echo "slurm_check: the daemons run as root here" >&2
  exit 77
fi

dir=$(mktemp -d /tmp/msh-slurm.XXXXXX)
conf=$dir/slurm.conf
host=$(hostname -s)
cpus=$(nproc)
pids=()
# slurmstepd processes of this cluster (found by the SLURM_CONF they inherited from slurmd)
our_stepds() {
  local f pid
  for f in /proc/[0-9]*/comm; do
    [ "$(cat "$f" 2> /dev/null)" = slurmstepd ] || continue
    pid=${f#/proc/}
    pid=${pid%/comm}
    { tr '\0' '\n' < "/proc/$pid/environ"; } 2> /dev/null | grep -qx "SLURM_CONF=$conf" && echo "$pid"
  done
}
cleanup() {
  # let finished steps report to slurmd before it goes
  for _ in $(seq 1 30); do
    [ -z "$(our_stepds)" ] && break
    sleep 0.1
  done
  for p in $(our_stepds); do pids+=("$p"); done
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null; done
  sleep 0.2
  for p in "${pids[@]}"; do kill -9 "$p" 2> /dev/null; done
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
    || echo $((20000 + RANDOM % 20000))
}
ctld_port=$(free_port)
d_port=$(free_port)
while [ "$d_port" = "$ctld_port" ]; do d_port=$(free_port); done

mkdir -p "$dir/munge" "$dir/ctld" "$dir/d"
head -c 1024 /dev/urandom > "$dir/munge/key"
chmod 600 "$dir/munge/key"
munged --force --key-file="$dir/munge/key" --socket="$dir/munge/socket" --pid-file="$dir/munge/pid" \
  --log-file="$dir/munge/log" --seed-file="$dir/munge/seed" || { echo "slurm_check: munged failed" >&2; exit 1; }
sleep 0.2
[ -f "$dir/munge/pid" ] && pids+=("$(cat "$dir/munge/pid")")

cat > "$conf" << EOF
ClusterName=moonshard
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
AuthType=auth/munge
AuthInfo=socket=$dir/munge/socket
CredType=cred/munge
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/d
SlurmctldPidFile=$dir/ctld.pid
SlurmdPidFile=$dir/d.pid
SlurmctldLogFile=$dir/ctld.log
SlurmdLogFile=$dir/d.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=check Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
export SLURM_CONF=$conf

slurmctld -f "$conf" -i || { echo "slurm_check: slurmctld failed" >&2; cat "$dir/ctld.log" >&2; exit 1; }
slurmd -f "$conf" || { echo "slurm_check: slurmd failed" >&2; cat "$dir/d.log" >&2; exit 1; }
sleep 0.3
[ -f "$dir/ctld.pid" ] && pids+=("$(cat "$dir/ctld.pid")")
[ -f "$dir/d.pid" ] && pids+=("$(cat "$dir/d.pid")")

# wait for the node to be idle
up=0
for _ in $(seq 1 100); do
  state=$(sinfo -h -N -o '%t' 2> /dev/null | head -1)
  case "$state" in idle*|mix*|alloc*) up=1; break ;; esac
  sleep 0.1
done
if [ $up -ne 1 ]; then
  echo "slurm_check: the node did not come up (state '$state')" >&2
  tail -20 "$dir/ctld.log" "$dir/d.log" >&2
  exit 1
fi

# srun passes its environment on; the ranks find each other through SLURM_* alone
# (-O: more tasks than cores is fine here; --immediate: fail rather than queue)
env -u RANK -u WORLD_SIZE -u LOCAL_RANK -u LOCAL_WORLD_SIZE -u MASTER_ADDR -u MASTER_PORT \
  srun -N 1 -n "$ntasks" -O --immediate=20 --kill-on-bad-exit=1 --time=10 "$exe" "$@" &
srun_pid=$!
pids=("$srun_pid" "${pids[@]}")
wait "$srun_pid"
exit $?
