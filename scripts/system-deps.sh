#!/usr/bin/env bash
# Install the Debian packages reflexarc's tests need (idempotent; a no-op when present).
# Mosquitto: the MQTT broker of the integration tests (the demo falls back to amqtt without it).
# Slurm: a real single-node scheduler for the batch engine and composer tests.
# docker.io + debootstrap: a real Docker engine and a locally built base image for deploy tests.
# openmpi-bin + libopenmpi-dev + libpmix-dev: MPI apps in the pilot tests (mpirun; srun --mpi=pmix needs PMIx before slurmd starts).
# prometheus: a real server scrapes a running pipeline in the metrics test (run on a free loopback port, never as a service).
set -euo pipefail
pkgs=(mosquitto mosquitto-clients slurmctld slurmd slurm-client docker.io debootstrap openmpi-bin libopenmpi-dev libpmix-dev prometheus)
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
# No package's service may start while installing (prometheus would take port 9090 for all):
# policy-rc.d refuses every start, and is removed again if we made it.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packages' own services are not wanted: tests start their own on free ports.
for svc in mosquitto slurmctld slurmd docker containerd prometheus; do
  $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
  $SUDO service "$svc" stop >/dev/null 2>&1 || true
done
