"""What a rendered job gets where its flag is not given: shared by the command's help, the renderer and the docs."""

DEFAULT_SHM_SIZE = "16Gi"
# Data loading takes up to 4 worker processes beside each training process (sftkit.setup.speed): 6 cores a GPU.
DEFAULT_CPUS_PER_GPU = 6
# Host memory of each training process besides the model's weights: torch, the CUDA context, data-loading workers.
PROCESS_MEMORY_GIB = 4
# The weights each process loads on the host when the model's config cannot be read here: a 4B model in float32.
FALLBACK_WEIGHTS_GIB = 16
# Restarts after a failed pod, each resuming from the latest checkpoint: a PyTorchJob's runPolicy.backoffLimit, the
# JobSet failurePolicy.maxRestarts of the TrainingRuntime rendered with a TrainJob.
DEFAULT_MAX_RESTARTS = 3
DEFAULT_TTL_SECONDS_AFTER_FINISHED = 7 * 24 * 3600  # a finished job and its pods stay a week, for their logs
# Seconds between SIGTERM and SIGKILL: sftkit saves a checkpoint on SIGTERM (Kubernetes' default is 30).
DEFAULT_TERMINATION_GRACE_PERIOD = 300
CLEAN_POD_POLICY = "Running"  # when a PyTorchJob ends, pods still running go; finished ones stay for their logs
