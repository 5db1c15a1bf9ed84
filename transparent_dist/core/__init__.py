"""The core: MPI world, collectives, sharding arithmetic, failures, stalls, preemption, output. Imports neither TensorFlow nor Keras."""
