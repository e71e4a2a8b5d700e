"""What a rendered job gets where its flag is not given: shared by the command's help and the renderer."""

DEFAULT_RUNTIME = "torch-distributed"  # Kubeflow Trainer's ClusterTrainingRuntime for torchrun-style jobs
DEFAULT_SHM_SIZE = "16Gi"
