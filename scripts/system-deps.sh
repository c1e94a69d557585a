#!/usr/bin/env bash
# Install the Debian packages reflexarc's tests need (idempotent; a no-op when present).
# Mosquitto: the MQTT broker of the integration tests (the demo falls back to amqtt without it).
# Slurm: a real single-node scheduler for the batch engine and composer tests.
# docker.io + debootstrap: a real Docker engine and a locally built base image for deploy tests.
# openmpi-bin + libopenmpi-dev + libpmix-dev: MPI apps in the pilot tests (mpirun; srun --mpi=pmix needs PMIx before slurmd starts).
set -euo pipefail
pkgs=(mosquitto mosquitto-clients slurmctld slurmd slurm-client docker.io debootstrap openmpi-bin libopenmpi-dev libpmix-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packages' own services are not wanted: tests start their own on free ports.
for svc in mosquitto slurmctld slurmd docker containerd; do
  $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
  $SUDO service "$svc" stop >/dev/null 2>&1 || true
done
