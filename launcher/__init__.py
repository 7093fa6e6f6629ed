"""Multi-node launcher: hostfiles, a preflight doctor for every node, and the ``deepspeed`` run.

``python -m launcher --help`` lists the commands (pretrain, finetune, doctor, hostfile); the README
section "Multi-node runs" and ``hostfiles/README.md`` show them in use. Modules: ``hostfile``
(parsing, filters, SLURM node lists), ``environment`` (``.deepspeed_env``; secrets kept off command lines),
``probe`` (what runs on each node), ``doctor`` (the checks and the table), ``launch`` (the command).
"""
