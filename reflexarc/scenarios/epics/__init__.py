"""An EPICS beamline: a caproto IOC (motor, detector), a Bluesky scan, a peak fit at the site, the motor moved there."""
