"""What is decided before training, once per run: the recipe resolved for this machine and launcher
(``resolve``), the speed defaults (``speed``), the launcher's config reconciled with the recipe (``launcher``),
the checks that stop a run before it loads anything (``preflight``) and what a rerun of an ended run does
(``rerun``). It sits above ``train``, whose pieces it chooses, and below the jobs that run it."""
