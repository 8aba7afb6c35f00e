"""Module paths of the programs the package starts itself, as ``python -m MODULE``.

Batch scripts, ``accelerate launch -m`` and the experiment runner start the trainer, the
evaluation and the per-node SLURM launcher by module path instead of through a file of a
checkout (``tools/train.py``): a path derived from ``__file__`` breaks once the package is
installed, while a module path works wherever ``import dist_ssl`` does. Nothing is imported here
(the modules are heavy); tests check that each path imports and has a ``main``.

The user-facing command lines follow one scheme: ``dist_ssl/<package>/cli_<command>.py`` with
a ``main(argv) -> int``, installed as the console script ``dist-ssl-<command>`` (pyproject.toml;
``_`` in the module name is ``-`` in the command).
"""

TRAIN_MODULE = "dist_ssl.engine.cli_train"        # dist-ssl-train
EVAL_MODULE = "dist_ssl.eval.cli_eval"            # dist-ssl-eval
NODE_LAUNCH_MODULE = "dist_ssl.slurm.node_launch"  # one srun task per node of a SLURM job
