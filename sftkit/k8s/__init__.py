"""The same recipe on a cluster: Kubeflow jobs rendered from it, and one launcher for every node.

``render`` builds the job Kubeflow Trainer (``TrainJob``) or the training operator (``PyTorchJob``)
runs, with a ConfigMap that carries the recipe and the accelerate config; ``bundle`` decides what
that ConfigMap holds; ``validation`` checks names, images and quantities before the API server does;
``launch`` maps the variables a scheduler sets (Kubeflow, torchrun-style, SLURM) onto explicit
``accelerate launch`` flags; ``commands`` parses ``sftkit k8s render`` and ``sftkit launch``.
"""
