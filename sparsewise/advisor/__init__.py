"""Match the workload to the hardware: measure this machine (probe), profile, project, report."""
