"""A simulated beamline: detector counts with spikes, a peak-fitting app, a motor actuator."""
